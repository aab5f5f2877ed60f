//! Random 128-bit identities of senders and receivers.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                $name(rand::random())
            }

            /// Parses the 32-digit lowercase or uppercase hex form.
            pub fn from_hex(s: &str) -> Option<Self> {
                let mut out = [0u8; 16];
                hex::decode_to_slice(s, &mut out).ok()?;
                Some($name(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }
    };
}

id_type!(
    /// Identity of one sender (`ipcbus::Sender`), random per instance; shown as 32 hex digits.
    SenderId
);
id_type!(
    /// Identity of one receiver (`ipcbus::Receiver`), random per instance; shown as 32 hex digits.
    ReceiverId
);
