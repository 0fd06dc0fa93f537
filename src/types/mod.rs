//! Vocabulary shared by every module: change batches, offsets, epochs and the
//! one error type that reaches a client ([`WeirError`], with its SQLSTATE).
//!
//! This module imports nothing of Weir; everything else may import it. It must
//! never grow behaviour beyond plain data and conversions.

mod change;
mod error;

pub use change::{ChangeBatch, WEIGHT_COLUMN};
pub use error::{SqlState, WeirError, WeirResult};

/// Position of a record in a log (a topic partition or a table's change log).
pub type Offset = u64;
