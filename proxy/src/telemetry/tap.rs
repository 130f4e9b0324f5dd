//! `sluice tap`: the live request stream (to be implemented).

use super::{RequestRecord, TelemetryConfig};

pub struct Tap {}

impl Tap {
    pub fn new(_cfg: &TelemetryConfig) -> Tap {
        Tap {}
    }

    pub fn on_request(&self, _rec: &RequestRecord<'_>) {}
}
