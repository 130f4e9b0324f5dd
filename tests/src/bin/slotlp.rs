//! slotlp: a test OTLP/gRPC trace collector, run inside a simulated node (or pod). It serves
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` (what `opentelemetry-otlp`'s
//! tonic exporter calls) and prints JSON lines on stdout, like the other workload binaries:
//!
//! - `{"event":"listening","addr":"127.0.0.1:4317"}` once bound;
//! - one `{"event":"export","spans":N,"peer":...}` per Export call;
//! - one `{"event":"span",...}` per received span: `trace_id`, `span_id`, `parent_span_id`
//!   (lowercase hex; an absent parent is `""`), `kind` ("CLIENT", "SERVER", ...), `name`,
//!   `start_ns`, `end_ns`, `attributes` and `resource` (maps of attribute key to value; ints
//!   stay numbers, booleans booleans), `scope`, and `status` (`code` "UNSET"/"OK"/"ERROR",
//!   `message`).
//!
//! `--fail-code N` answers every Export with that gRPC status instead (the spans are still
//! printed, with `"rejected": true` on the export line), for tests of exporter failures.

use std::{
    io::{self, Write},
    net::SocketAddr,
    process::ExitCode,
};

use clap::Parser;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value as Av, AnyValue, KeyValue},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use serde_json::{json, Map, Value};
use tonic::{
    transport::{server::TcpIncoming, Server},
    Code, Request, Response, Status,
};

#[derive(Parser)]
#[command(name = "slotlp", about = "Test OTLP/gRPC trace collector: one JSON line per received span")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    #[arg(long, default_value_t = 4317)]
    port: u16,
    /// Answer every Export with this gRPC status code (0: accept).
    #[arg(long, default_value_t = 0)]
    fail_code: i32,
}

/// Prints one JSON line (write errors ignored, as in simpod).
fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn any_value(v: &AnyValue) -> Value {
    match &v.value {
        None => Value::Null,
        Some(Av::StringValue(s)) => json!(s),
        Some(Av::BoolValue(b)) => json!(b),
        Some(Av::IntValue(i)) => json!(i),
        Some(Av::DoubleValue(d)) => json!(d),
        Some(Av::BytesValue(b)) => json!(hex(b)),
        Some(Av::ArrayValue(a)) => Value::Array(a.values.iter().map(any_value).collect()),
        Some(Av::KvlistValue(kv)) => Value::Object(attributes(&kv.values)),
        #[allow(unreachable_patterns)]
        Some(_) => json!(format!("{v:?}")),
    }
}

fn attributes(kvs: &[KeyValue]) -> Map<String, Value> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Value::Null, any_value))).collect()
}

fn kind_name(k: i32) -> String {
    match SpanKind::try_from(k) {
        Ok(SpanKind::Unspecified) => "UNSPECIFIED".into(),
        Ok(SpanKind::Internal) => "INTERNAL".into(),
        Ok(SpanKind::Server) => "SERVER".into(),
        Ok(SpanKind::Client) => "CLIENT".into(),
        Ok(SpanKind::Producer) => "PRODUCER".into(),
        Ok(SpanKind::Consumer) => "CONSUMER".into(),
        Err(_) => format!("UNKNOWN({k})"),
    }
}

fn status_name(c: i32) -> String {
    match StatusCode::try_from(c) {
        Ok(StatusCode::Unset) => "UNSET".into(),
        Ok(StatusCode::Ok) => "OK".into(),
        Ok(StatusCode::Error) => "ERROR".into(),
        Err(_) => format!("UNKNOWN({c})"),
    }
}

struct Collector {
    fail_code: i32,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string());
        let req = request.into_inner();
        let mut n = 0usize;
        for rs in &req.resource_spans {
            let resource = rs.resource.as_ref().map(|r| attributes(&r.attributes)).unwrap_or_default();
            for ss in &rs.scope_spans {
                let scope = ss.scope.as_ref().map(|s| json!({"name": s.name, "version": s.version}));
                for s in &ss.spans {
                    n += 1;
                    let status = s.status.as_ref();
                    emit(json!({
                        "event": "span",
                        "trace_id": hex(&s.trace_id),
                        "span_id": hex(&s.span_id),
                        "parent_span_id": hex(&s.parent_span_id),
                        "trace_state": s.trace_state,
                        "flags": s.flags,
                        "kind": kind_name(s.kind),
                        "name": s.name,
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "attributes": attributes(&s.attributes),
                        "resource": resource,
                        "scope": scope,
                        "status": {
                            "code": status.map_or_else(|| "UNSET".to_string(), |st| status_name(st.code)),
                            "message": status.map(|st| st.message.clone()).unwrap_or_default(),
                        },
                    }));
                }
            }
        }
        let rejected = self.fail_code != 0;
        emit(json!({"event": "export", "spans": n, "peer": peer, "rejected": rejected}));
        if rejected {
            return Err(Status::new(Code::from(self.fail_code), "slotlp: rejected by --fail-code"));
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            emit(json!({"event": "error", "stage": "runtime", "error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    };
    let ok = rt.block_on(async {
        let listener = match tokio::net::TcpListener::bind((cli.bind.as_str(), cli.port)).await {
            Ok(l) => l,
            Err(e) => {
                emit(json!({"event": "error", "stage": "bind", "error": e.to_string()}));
                return false;
            }
        };
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        emit(json!({"event": "listening", "addr": addr.map(|a| a.to_string())}));
        let svc = TraceServiceServer::new(Collector { fail_code: cli.fail_code });
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        match Server::builder().serve_with_incoming(svc, incoming).await {
            Ok(()) => true,
            Err(e) => {
                emit(json!({"event": "error", "stage": "serve", "error": e.to_string()}));
                false
            }
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
