//! The contract between VirtualService destinations and DestinationRules: what a
//! destination's `subset` means for a Service.
//!
//! STUB until DestinationRules land (their module owns this function and replaces this file):
//! every subset is unknown, so a request routed to one gets 503 `no-cluster`, as Envoy answers
//! for a cluster Istio did not generate.

use super::super::model::Labels;
use super::super::snapshot::Model;

/// What a subset selects: the labels its endpoints' pods must carry (the DestinationRule
/// branch's `SubsetSel` has the same `labels` field, plus the merged traffic policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetSel {
    pub labels: Labels,
}

/// The subset `subset` of Service `service_ns/service_name`, or why there is none.
pub fn resolve_subset(_model: &Model, service_ns: &str, service_name: &str, subset: &str) -> Result<SubsetSel, String> {
    Err(format!(
        "subset {subset:?} of {service_ns}/{service_name} is not defined (no DestinationRule defines subsets in this version)"
    ))
}
