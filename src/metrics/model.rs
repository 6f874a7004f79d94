//! The label sets of what workers count: which method a request had, why a connection was turned away.
//! Small closed enums, so a client cannot grow the number of series; the server names its requests and
//! refusals with them, and the cell layout ([`super::layout`]) indexes its counters by them.

/// The `method` label: the methods web apps serve, and `other`, so a client inventing methods cannot grow
/// the number of series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    pub const ALL: [Self; 8] =
        [Self::Get, Self::Head, Self::Post, Self::Put, Self::Delete, Self::Patch, Self::Options, Self::Other];

    pub fn from_bytes(method: &[u8]) -> Self {
        match method {
            b"GET" => Self::Get,
            b"HEAD" => Self::Head,
            b"POST" => Self::Post,
            b"PUT" => Self::Put,
            b"DELETE" => Self::Delete,
            b"PATCH" => Self::Patch,
            b"OPTIONS" => Self::Options,
            _ => Self::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
            Self::Other => "other",
        }
    }
}

/// Why a connection was turned away before the app saw it (the `kind` label of `protocol_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolErrorKind {
    /// The vars block is over `--buffer-size` (nginx sends up to 65535 bytes: raise it).
    DatasizeTooLarge,
    /// A WSGI packet with no vars at all.
    EmptyPacket,
    /// A var with an empty name.
    EmptyKey,
    /// A var runs past the end of the vars block.
    TruncatedRecord,
    /// More vars than the parser takes.
    TooManyVars,
    /// Any other malformed packet.
    InvalidPacket,
    /// A modifier other than WSGI and ping.
    UnsupportedModifier,
    /// Plain HTTP sent to the uwsgi socket (a `proxy_pass` mistake).
    PlainHttp,
    /// A well-formed packet without what a request needs (no method, a bad `CONTENT_LENGTH`).
    BadRequest,
    /// `CONTENT_LENGTH` over `--limit-post`.
    BodyTooLarge,
    /// The peer closed in the middle of a packet.
    Truncated,
    /// Nothing arrived within `--socket-timeout`.
    Timeout,
    /// The read itself failed.
    ReadError,
    /// A `--ssl-socket` peer failed the TLS handshake: no client certificate or a wrong one, plain uwsgi
    /// sent to the TLS port, or no handshake in time.
    TlsHandshake,
}

impl From<oxwsgi_proto::ProtocolError> for ProtocolErrorKind {
    fn from(error: oxwsgi_proto::ProtocolError) -> Self {
        use oxwsgi_proto::ProtocolError as Parser;
        match error {
            Parser::DataSizeTooLarge { .. } => Self::DatasizeTooLarge,
            Parser::EmptyPacket => Self::EmptyPacket,
            Parser::EmptyKey { .. } => Self::EmptyKey,
            Parser::TruncatedRecord { .. } => Self::TruncatedRecord,
            Parser::TooManyVars { .. } => Self::TooManyVars,
            // Encoder-only: never returned by the parser.
            Parser::FieldTooLong => Self::InvalidPacket,
        }
    }
}

impl ProtocolErrorKind {
    pub const ALL: [Self; 14] = [
        Self::DatasizeTooLarge,
        Self::EmptyPacket,
        Self::EmptyKey,
        Self::TruncatedRecord,
        Self::TooManyVars,
        Self::InvalidPacket,
        Self::UnsupportedModifier,
        Self::PlainHttp,
        Self::BadRequest,
        Self::BodyTooLarge,
        Self::Truncated,
        Self::Timeout,
        Self::ReadError,
        Self::TlsHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            // The parser's own names (oxwsgi_proto::ProtocolError::kind_label), for the kinds it reports.
            Self::DatasizeTooLarge => "datasize_too_large",
            Self::EmptyPacket => "empty_packet",
            Self::EmptyKey => "empty_key",
            Self::TruncatedRecord => "truncated_record",
            Self::TooManyVars => "too_many_vars",
            Self::InvalidPacket => "invalid_packet",
            Self::UnsupportedModifier => "unsupported_modifier",
            Self::PlainHttp => "plain_http",
            Self::BadRequest => "bad_request",
            Self::BodyTooLarge => "body_too_large",
            Self::Truncated => "truncated",
            Self::Timeout => "timeout",
            Self::ReadError => "read_error",
            Self::TlsHandshake => "tls_handshake",
        }
    }
}
