//! Helpers shared by the ipcbus examples: the options every example takes.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
