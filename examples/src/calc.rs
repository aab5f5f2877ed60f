//! The calculator service of the `calc_server` / `calc_client` examples: a typed
//! service (`#[ipcbus::service]`) with a typed error and a callback the server uses
//! to report progress to the client that called.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a calculation failed: the error of [`Calc`]'s methods, which arrives on the
/// client as this type (not as a string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalcError {
    /// The result does not fit in an `i64`.
    Overflow,
    /// `dividend / 0`.
    DivideByZero {
        /// What was to be divided.
        dividend: i64,
    },
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalcError::Overflow => f.write_str("the result overflows an i64"),
            CalcError::DivideByZero { dividend } => write!(f, "{dividend} divided by zero"),
        }
    }
}

impl std::error::Error for CalcError {}

/// What the calculator tells the client that called while it works (served by the
/// client, called by the server).
#[ipcbus::service(name = "calc.events")]
pub trait CalcEvents {
    /// `done` of `of` numbers are added, the running total is `total`.
    async fn progress(&self, done: u64, of: u64, total: i64);
}

/// A calculator. Version 2 of the contract `calc`; clients built against its old
/// name `calc.v1` are still answered.
#[ipcbus::service(name = "calc", version = 2, aliases = ["calc.v1"], callback = CalcEvents)]
pub trait Calc {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `a / b`, rounded towards zero.
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// The sum of `numbers`, reporting progress to the caller through
    /// [`CalcEvents::progress`] as it goes.
    async fn sum(&self, numbers: Vec<i64>) -> Result<i64, CalcError>;
}
