//! The contract of the `calc_server` / `calc_client` pair: a typed service with a
//! typed error, and a callback contract the server calls back into its client with.

use serde::{Deserialize, Serialize};

/// What can go wrong in a calculation; arrives on the client as this type
/// (`ipcbus::ServiceError::App`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalcError {
    /// The result does not fit in an `i64`.
    Overflow,
    /// Division by zero.
    DivideByZero,
}

impl std::fmt::Display for CalcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CalcError::Overflow => "overflow",
            CalcError::DivideByZero => "division by zero",
        })
    }
}

/// Arithmetic in another process. Version 2; clients built when the contract was
/// called `calc.v1` are still served.
#[ipcbus::service(version = 2, aliases = ["calc.v1"], callback = CalcEvents)]
pub trait Calc {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `a / b`, rounded toward zero.
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// The sum of `values`, one at a time, telling the caller how far it got through
    /// [`CalcEvents::progress`] after each.
    async fn sum(&self, values: Vec<i64>) -> Result<i64, CalcError>;
    /// How many calls this server has answered.
    async fn served(&self) -> u64;
}

/// What the server tells the client while it works (served by the client).
#[ipcbus::service]
pub trait CalcEvents {
    /// `done` of `total` steps are done.
    async fn progress(&self, done: u32, total: u32);
}
