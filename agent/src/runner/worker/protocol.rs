//! The worker protocol's two framings (`blaze.worker`): **proto**, each
//! message preceded by its length as a base-128 varint, and **JSON**, each
//! message one JSON value in the proto3 JSON mapping (a response need not
//! end its line: the reader takes one complete value).
//!
//! A response is bounded (`max`): a worker that announces or writes more
//! is broken, as is one that writes something that does not parse.

use base64::Engine as _;
use outpost_proto::blaze::worker::{WorkRequest, WorkResponse};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// How requests and responses are framed (`persistentWorkerProtocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Framing {
    Proto,
    Json,
}

impl Framing {
    /// `proto` (the default when unset) or `json`.
    pub fn parse(value: Option<&str>) -> Result<Framing, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(Framing::Proto),
            Some(v) if v.eq_ignore_ascii_case("proto") => Ok(Framing::Proto),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Framing::Json),
            Some(v) => Err(format!(
                "platform property persistentWorkerProtocol={} is not proto or json",
                outpost_proto::quote::quoted(v)
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Framing::Proto => "proto",
            Framing::Json => "json",
        }
    }

    /// `request` as the worker reads it.
    pub fn encode(self, request: &WorkRequest) -> Vec<u8> {
        match self {
            Framing::Proto => request.encode_length_delimited_to_vec(),
            Framing::Json => {
                // Every field written, as Bazel's JSON writer does; bytes
                // in base64 as the JSON mapping says.
                let inputs: Vec<serde_json::Value> = request
                    .inputs
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "path": i.path,
                            "digest": base64::engine::general_purpose::STANDARD.encode(&i.digest),
                        })
                    })
                    .collect();
                let value = serde_json::json!({
                    "arguments": request.arguments,
                    "inputs": inputs,
                    "requestId": request.request_id,
                    "cancel": request.cancel,
                    "verbosity": request.verbosity,
                    "sandboxDir": request.sandbox_dir,
                });
                let mut line = value.to_string().into_bytes();
                line.push(b'\n');
                line
            }
        }
    }

    /// Reads one response of at most `max` bytes from `from`.
    pub async fn read(
        self,
        from: &mut (impl AsyncRead + Unpin),
        max: usize,
    ) -> Result<WorkResponse, Broken> {
        match self {
            Framing::Proto => read_proto(from, max).await,
            Framing::Json => read_json(from, max).await,
        }
    }
}

/// Why a worker's answer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error("the worker closed its stdout")]
    Closed,
    #[error("reading the worker's stdout failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker's response is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the worker's response does not parse: {0}")]
    Garbage(String),
}

async fn byte(from: &mut (impl AsyncRead + Unpin)) -> Result<u8, Broken> {
    match from.read_u8().await {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Broken::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn read_proto(
    from: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<WorkResponse, Broken> {
    let mut len: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = byte(from).await?;
        len |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        if shift >= 63 {
            return Err(Broken::Garbage("the length prefix is not a varint".into()));
        }
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(Broken::TooLarge(max));
    }
    let mut body = vec![0u8; len];
    from.read_exact(&mut body)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Broken::Closed,
            _ => Broken::Io(e),
        })?;
    WorkResponse::decode(&body[..]).map_err(|e| Broken::Garbage(e.to_string()))
}

async fn read_json(
    from: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<WorkResponse, Broken> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One byte at a time past the first value would be wasteful, but a
        // singleplex worker writes nothing after its response until it gets
        // the next request, so whatever arrives belongs to this one.
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Err(if buf.iter().all(u8::is_ascii_whitespace) {
                Broken::Closed
            } else {
                Broken::Garbage("the worker closed its stdout mid-response".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > max {
            return Err(Broken::TooLarge(max));
        }
        let mut values =
            serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
        match values.next() {
            None => continue,
            Some(Err(e)) if e.is_eof() => continue,
            Some(Err(e)) => return Err(Broken::Garbage(e.to_string())),
            Some(Ok(value)) => return response_of_json(&value),
        }
    }
}

/// A response in the JSON mapping: the camel-case names or the proto
/// names, absent fields zero, unknown ones ignored.
fn response_of_json(value: &serde_json::Value) -> Result<WorkResponse, Broken> {
    let object = value
        .as_object()
        .ok_or_else(|| Broken::Garbage(format!("expected a JSON object, got {value}")))?;
    let field = |camel: &str, snake: &str| object.get(camel).or_else(|| object.get(snake));
    let int = |camel: &str, snake: &str| -> Result<i32, Broken> {
        match field(camel, snake) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| Broken::Garbage(format!("{camel} is not a 32-bit integer: {v}"))),
        }
    };
    let output = match field("output", "output") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => return Err(Broken::Garbage(format!("output is not a string: {v}"))),
    };
    Ok(WorkResponse {
        exit_code: int("exitCode", "exit_code")?,
        output,
        request_id: int("requestId", "request_id")?,
        was_cancelled: field("wasCancelled", "was_cancelled")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::blaze::worker::Input;

    fn response(bytes: &[u8], framing: Framing, max: usize) -> Result<WorkResponse, Broken> {
        let mut from = bytes;
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(framing.read(&mut from, max))
    }

    #[test]
    fn proto_responses_are_length_delimited_and_bounded() {
        let sent = WorkResponse {
            exit_code: 3,
            output: "warning: x".into(),
            ..Default::default()
        };
        let bytes = sent.encode_length_delimited_to_vec();
        assert_eq!(response(&bytes, Framing::Proto, 1024).expect("ok"), sent);
        assert!(matches!(
            response(&bytes, Framing::Proto, 4),
            Err(Broken::TooLarge(4))
        ));
        assert!(matches!(
            response(&bytes[..bytes.len() - 1], Framing::Proto, 1024),
            Err(Broken::Closed)
        ));
        assert!(matches!(
            response(&[], Framing::Proto, 1024),
            Err(Broken::Closed)
        ));
        // Not a WorkResponse: field 1 with a wire type it cannot have.
        assert!(matches!(
            response(&[2, 0x0b, 0x00], Framing::Proto, 1024),
            Err(Broken::Garbage(_))
        ));
    }

    #[test]
    fn json_responses_are_one_value_not_necessarily_a_line() {
        let got = response(
            b"{\"exitCode\": 1,\n \"output\": \"bad\\n\"}",
            Framing::Json,
            1024,
        )
        .expect("ok");
        assert_eq!((got.exit_code, got.output.as_str()), (1, "bad\n"));
        let got = response(b"{\"exit_code\": 2, \"extra\": [1]}", Framing::Json, 1024).expect("ok");
        assert_eq!(got.exit_code, 2);
        assert_eq!(
            response(b"{}", Framing::Json, 1024).expect("ok").exit_code,
            0
        );
        for garbage in [&b"not json"[..], b"[1, 2]", b"{\"exitCode\": \"x\"}"] {
            assert!(
                matches!(
                    response(garbage, Framing::Json, 1024),
                    Err(Broken::Garbage(_))
                ),
                "{}",
                String::from_utf8_lossy(garbage)
            );
        }
        assert!(matches!(
            response(b"{\"exitCode\": 0", Framing::Json, 1024),
            Err(Broken::Garbage(_))
        ));
        assert!(matches!(
            response(b"  \n", Framing::Json, 1024),
            Err(Broken::Closed)
        ));
        let long = format!("{{\"output\": \"{}\"}}", "x".repeat(100));
        assert!(matches!(
            response(long.as_bytes(), Framing::Json, 50),
            Err(Broken::TooLarge(50))
        ));
    }

    #[test]
    fn requests_are_written_in_either_framing() {
        let request = WorkRequest {
            arguments: vec!["--out".into(), "a b".into()],
            inputs: vec![Input {
                path: "src/a.txt".into(),
                digest: b"ab12".to_vec().into(),
            }],
            ..Default::default()
        };
        let proto = Framing::Proto.encode(&request);
        assert_eq!(
            WorkRequest::decode_length_delimited(&proto[..]).expect("decodes"),
            request
        );
        let json = Framing::Json.encode(&request);
        assert_eq!(json.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["arguments"][1], "a b");
        assert_eq!(value["inputs"][0]["path"], "src/a.txt");
        assert_eq!(value["inputs"][0]["digest"], "YWIxMg==");
        assert_eq!(value["requestId"], 0);
        assert_eq!(Framing::parse(Some("JSON")).expect("json"), Framing::Json);
        assert_eq!(Framing::parse(None).expect("default"), Framing::Proto);
        assert!(Framing::parse(Some("xml")).is_err());
    }
}
