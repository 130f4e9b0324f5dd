//! Access logs (to be implemented).

use super::{ConnRecord, RequestRecord, TelemetryConfig};

pub struct AccessLog {}

impl AccessLog {
    pub fn new(_cfg: &TelemetryConfig) -> AccessLog {
        AccessLog {}
    }

    pub fn on_request(&self, _rec: &RequestRecord<'_>) {}

    pub fn on_connection(&self, _rec: &ConnRecord<'_>) {}
}
