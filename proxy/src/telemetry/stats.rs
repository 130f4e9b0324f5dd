//! `sluice stat`: rolling windows per pod and Service (to be implemented).

use super::{RequestRecord, TelemetryConfig};

pub struct Stats {}

impl Stats {
    pub fn new(_cfg: &TelemetryConfig) -> Stats {
        Stats {}
    }

    pub fn on_request(&self, _rec: &RequestRecord<'_>) {}
}
