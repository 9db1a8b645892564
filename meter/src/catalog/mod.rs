//! The catalog: what is sold (plans, add-ons) and what it grants (features, limits).
//!
//! Start at [`Catalog`]; [`load`] turns a file into a validated catalog with errors that
//! name the file, the path inside it and the reason; [`validate_successor`] keeps published
//! plan versions immutable when a new catalog replaces an old one.

mod load;
mod model;
mod unique;
mod validate;

pub use load::{parse, CatalogError, Problem};
pub use model::*;
pub use validate::{validate, validate_successor, MAX_AMOUNT, MAX_GRACE_DAYS};
