//! What the code `#[ipcbus::service]` generates calls into (through
//! `ipcbus::__private`): encoding a method's arguments and reply, and turning an
//! application error back into the method's own error type. Not part of the API.
//!
//! Arguments travel as a postcard tuple of the method's arguments in order (one
//! argument: the value itself, which is how postcard encodes a 1-tuple; none: no
//! bytes), the reply as the postcard return value, a method's `Err(e)` as a
//! [`RemoteCode::Application`] error whose detail is postcard `e`. Both ends refuse
//! bytes left over after the value: a body of another shape is an error, not a value
//! read from its first bytes.

use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::call::{CallError, Caller, Contract, RemoteCode, RemoteError, ServiceError};

/// Starts the call of `method` with `args` (postcard) through `caller`; a failure to
/// encode comes out of the future as [`CallError::Encode`].
pub fn call<C: Caller, A: Serialize + ?Sized>(
    caller: &C,
    contract: &Contract,
    method: &str,
    args: &A,
    timeout: Option<Duration>,
) -> BoxFuture<'static, Result<Bytes, CallError>> {
    match postcard::to_stdvec(args) {
        Ok(body) => caller.call_raw(contract, method, Bytes::from(body), timeout),
        Err(e) => ready(Err(CallError::Encode(e.to_string()))),
    }
}

/// The outcome of a call of a method returning `Result<T, E>`: the reply decoded as
/// `T`, an application error decoded as `E`, or the failure of the call.
pub async fn fallible<T, E>(
    call: BoxFuture<'static, Result<Bytes, CallError>>,
) -> Result<T, ServiceError<E>>
where
    T: DeserializeOwned + Send + 'static,
    E: DeserializeOwned + Send + 'static,
{
    match call.await {
        Ok(body) => decode_reply(&body).map_err(ServiceError::Call),
        Err(CallError::Remote(err)) if err.code == RemoteCode::Application => {
            match decode_exact::<E>(&err.detail) {
                Ok(e) => Err(ServiceError::App(e)),
                Err(why) => Err(ServiceError::Call(CallError::Decode(format!(
                    "application error {:?} whose detail is not a {}: {why}",
                    err.message,
                    std::any::type_name::<E>()
                )))),
            }
        }
        Err(e) => Err(ServiceError::Call(e)),
    }
}

/// The outcome of a call of a method returning a plain `T`.
pub async fn infallible<T>(
    call: BoxFuture<'static, Result<Bytes, CallError>>,
) -> Result<T, CallError>
where
    T: DeserializeOwned + Send + 'static,
{
    decode_reply(&call.await?)
}

/// Decodes a request's arguments; [`RemoteError::bad_request`] when they are not an
/// `A`.
///
/// # Errors
/// As said.
pub fn decode_args<A: DeserializeOwned>(body: &[u8]) -> Result<A, RemoteError> {
    decode_exact(body).map_err(RemoteError::bad_request)
}

/// The reply to a call that returned `value`.
///
/// # Errors
/// An application error when `value` does not serialize.
pub fn reply<T: Serialize>(value: &T) -> Result<Bytes, RemoteError> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|e| RemoteError::new(format!("the reply does not serialize: {e}")))
}

/// The reply to a call that returned `result`: `Err(e)` is an application error with
/// the message `format!("{e:?}")` and the detail postcard `e` (no detail when `e`
/// does not serialize).
///
/// # Errors
/// As said.
pub fn reply_fallible<T: Serialize, E: Serialize + Debug>(
    result: Result<T, E>,
) -> Result<Bytes, RemoteError> {
    match result {
        Ok(value) => reply(&value),
        Err(e) => {
            let message = format!("{e:?}");
            Err(RemoteError::with_detail(message.clone(), &e)
                .unwrap_or_else(|_| RemoteError::new(message)))
        }
    }
}

/// A future that is ready with `value`.
pub fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

/// The reply bytes decoded as a `T`.
fn decode_reply<T: DeserializeOwned>(body: &[u8]) -> Result<T, CallError> {
    decode_exact(body).map_err(CallError::Decode)
}

/// `bytes` decoded as exactly one `T` (postcard), nothing left over.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!(
            "{} bytes left after a {}",
            rest.len(),
            std::any::type_name::<T>()
        )),
        Err(e) => Err(format!("not a {}: {e}", std::any::type_name::<T>())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_a_postcard_tuple() {
        let two = postcard::to_stdvec(&(&1i64, &"x".to_string())).unwrap();
        assert_eq!(two, postcard::to_stdvec(&(1i64, "x")).unwrap());
        let one = postcard::to_stdvec(&(&7u32,)).unwrap();
        assert_eq!(one, postcard::to_stdvec(&7u32).unwrap());
        assert!(postcard::to_stdvec(&()).unwrap().is_empty());
        let (a, b): (i64, String) = decode_args(&two).unwrap();
        assert_eq!((a, b.as_str()), (1, "x"));
    }

    #[test]
    fn arguments_of_another_shape_are_a_bad_request() {
        let body = postcard::to_stdvec(&(1i64, 2i64)).unwrap();
        let e = decode_args::<(i64,)>(&body).unwrap_err();
        assert_eq!(e.code, RemoteCode::BadRequest);
        assert!(e.message.contains("bytes left"), "{e}");
        let e = decode_args::<(String,)>(&[0xff]).unwrap_err();
        assert_eq!(e.code, RemoteCode::BadRequest);
    }

    #[test]
    fn an_error_travels_as_its_debug_and_postcard() {
        #[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
        enum Oops {
            Bad(u8),
        }
        let e = reply_fallible::<(), _>(Err(Oops::Bad(3))).unwrap_err();
        assert_eq!(e.code, RemoteCode::Application);
        assert_eq!(e.message, "Bad(3)");
        assert_eq!(e.decode_detail::<Oops>().unwrap(), Oops::Bad(3));
        let ok = reply_fallible::<u16, Oops>(Ok(300)).unwrap();
        assert_eq!(postcard::from_bytes::<u16>(&ok).unwrap(), 300);
    }
}
