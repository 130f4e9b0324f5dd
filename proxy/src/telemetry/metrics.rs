//! Istio's standard metrics and sluice's own (to be implemented).

use super::{ConnRecord, RequestRecord, TelemetryConfig};

#[derive(Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new(_cfg: &TelemetryConfig) -> Metrics {
        Metrics {}
    }

    pub fn on_request(&self, _rec: &RequestRecord<'_>) {}

    pub fn on_connection_opened(&self, _rec: &ConnRecord<'_>) {}

    pub fn on_connection_closed(&self, _rec: &ConnRecord<'_>) {}
}
