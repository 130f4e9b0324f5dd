//! The contract between VirtualService destinations and DestinationRules: what a
//! destination's `subset` means for a Service. DestinationRules own it
//! ([`super::destination_rule`]); this module keeps the path VirtualService routing imports.

pub use super::destination_rule::{resolve_subset, SubsetSel};
