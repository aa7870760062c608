//! Trust without a trusted party: receipts that receivers sign for the updates they used,
//! the server's hash-chained ledger of them, and the credits anyone can recompute from it
//! (docs/protocol.md, "Receipts, the ledger and credits").

pub mod credits;
pub mod head;
pub mod ledger;
pub mod receipt;
