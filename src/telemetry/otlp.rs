//! OTLP protobuf encoding of the relay's spans: an `ExportTraceServiceRequest`
//! (opentelemetry-proto, `collector/trace/v1/trace_service.proto`), written by hand.
//!
//! Only the fields the relay sets are written; protobuf readers take absent fields as
//! their defaults. The field numbers are the stable OTLP 1.x ones, and the unit and
//! integration tests decode what this writes with the official generated types
//! (`opentelemetry-proto`, a dev-dependency), so a wrong number or wire type fails
//! there. Why by hand: see `Cargo.toml` (no protobuf runtime, no OpenTelemetry SDK in
//! the binary for the 15 fields used).

/// An attribute value: the two kinds the relay's spans use.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// `Status.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Ok = 1,
    Error = 2,
}

/// One finished span, as the exporter queue carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    /// W3C trace flags of the span (bit 0: sampled).
    pub trace_flags: u8,
    /// The carried `tracestate`, if any.
    pub trace_state: Option<String>,
    pub name: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub status: StatusCode,
    /// `Status.message` (the dead-letter reason); empty for OK.
    pub status_message: String,
}

/// `Span.SpanKind.SPAN_KIND_PRODUCER`.
const KIND_PRODUCER: u64 = 4;
/// `SpanFlags`: the parent's context is known to be remote (it came in a header).
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A nested message: written to a scratch buffer, then length-prefixed.
fn message_field(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes_field(out, field, &inner);
}

/// `common.v1.KeyValue` { key = 1; AnyValue value = 2 { string = 1 | int = 3 } }.
fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &Value) {
    message_field(out, field, |kv| {
        bytes_field(kv, 1, k.as_bytes());
        message_field(kv, 2, |any| match v {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Int(i) => {
                key(any, 3, VARINT);
                varint(any, *i as u64);
            }
        });
    });
}

/// `trace.v1.Span`.
fn span(out: &mut Vec<u8>, s: &SpanData) {
    bytes_field(out, 1, &s.trace_id);
    bytes_field(out, 2, &s.span_id);
    if let Some(state) = s.trace_state.as_deref().filter(|t| !t.is_empty()) {
        bytes_field(out, 3, state.as_bytes());
    }
    bytes_field(out, 4, &s.parent_span_id);
    bytes_field(out, 5, s.name.as_bytes());
    key(out, 6, VARINT);
    varint(out, KIND_PRODUCER);
    key(out, 7, FIXED64);
    out.extend_from_slice(&s.start_unix_ns.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&s.end_unix_ns.to_le_bytes());
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    message_field(out, 15, |st| {
        if !s.status_message.is_empty() {
            bytes_field(st, 2, s.status_message.as_bytes());
        }
        key(st, 3, VARINT);
        varint(st, s.status as u64);
    });
    key(out, 16, FIXED32);
    let flags = u32::from(s.trace_flags) | FLAGS_HAS_IS_REMOTE | FLAGS_IS_REMOTE;
    out.extend_from_slice(&flags.to_le_bytes());
}

/// The name and version of the instrumentation scope (this crate).
pub const SCOPE: &str = "outbox-relay";

/// `collector.trace.v1.ExportTraceServiceRequest` with one `ResourceSpans` (resource
/// attributes `resource`) holding one `ScopeSpans` with `spans`.
pub fn export_request(resource: &[(&'static str, Value)], spans: &[SpanData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + spans.len() * 400);
    message_field(&mut out, 1, |rs| {
        message_field(rs, 1, |r| {
            for (k, v) in resource {
                key_value(r, 1, k, v);
            }
        });
        message_field(rs, 2, |ss| {
            message_field(ss, 1, |scope| {
                bytes_field(scope, 1, SCOPE.as_bytes());
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                message_field(ss, 2, |out| span(out, s));
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode as Code;
    use prost::Message;

    use super::*;

    fn sample(status: StatusCode, message: &str) -> SpanData {
        SpanData {
            trace_id: [0x4b; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: [9; 8],
            trace_flags: 1,
            trace_state: Some("congo=t61rcWkgMzE".into()),
            name: "publish outbox.order.created".into(),
            start_unix_ns: 1_700_000_000_123_456_789,
            end_unix_ns: 1_700_000_000_223_456_789,
            attributes: vec![
                ("messaging.system", Value::Str("nats".into())),
                ("messaging.message.body.size", Value::Int(300)),
                ("negative", Value::Int(-5)),
            ],
            status,
            status_message: message.into(),
        }
    }

    /// What this module writes is what the official OTLP types read.
    #[test]
    fn decodes_with_the_official_types() {
        let resource = [("service.name", Value::Str("relay-a".into()))];
        let spans = [
            sample(StatusCode::Ok, ""),
            sample(StatusCode::Error, "no stream captures the subject"),
        ];
        let bytes = export_request(&resource, &spans);
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let attr = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(attr.key, "service.name");
        assert_eq!(
            attr.value.as_ref().unwrap().value,
            Some(Any::StringValue("relay-a".into()))
        );
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "outbox-relay");
        assert_eq!(ss.spans.len(), 2);
        let s = &ss.spans[0];
        assert_eq!(s.trace_id, vec![0x4b; 16]);
        assert_eq!(s.span_id, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(s.trace_state, "congo=t61rcWkgMzE");
        assert_eq!(s.name, "publish outbox.order.created");
        assert_eq!(s.kind(), SpanKind::Producer);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_223_456_789);
        assert_eq!(s.flags, 0x301);
        let attrs: Vec<(String, Option<Any>)> = s
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().and_then(|v| v.value.clone()),
                )
            })
            .collect();
        assert_eq!(
            attrs,
            vec![
                (
                    "messaging.system".into(),
                    Some(Any::StringValue("nats".into()))
                ),
                (
                    "messaging.message.body.size".into(),
                    Some(Any::IntValue(300))
                ),
                ("negative".into(), Some(Any::IntValue(-5))),
            ]
        );
        assert_eq!(s.status.as_ref().unwrap().code(), Code::Ok);
        let e = ss.spans[1].status.as_ref().unwrap();
        assert_eq!(e.code(), Code::Error);
        assert_eq!(e.message, "no stream captures the subject");
    }

    #[test]
    fn empty_trace_state_is_omitted_and_empty_batches_encode() {
        let mut s = sample(StatusCode::Ok, "");
        s.trace_state = None;
        let req = ExportTraceServiceRequest::decode(export_request(&[], &[s]).as_slice()).unwrap();
        assert_eq!(
            req.resource_spans[0].scope_spans[0].spans[0].trace_state,
            ""
        );
        let req = ExportTraceServiceRequest::decode(export_request(&[], &[]).as_slice()).unwrap();
        assert!(req.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(
                prost::encoding::decode_varint(&mut out.as_slice()).unwrap(),
                v
            );
        }
    }
}
