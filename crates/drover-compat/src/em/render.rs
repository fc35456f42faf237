//! The one place where the EM dialect chooses between XML and JSON, for answers and errors alike.
//!
//! Handlers never write bytes. They return an [`Element`] tree (or an [`EmError`]); both
//! `IntoResponse` impls park the tree in the response's extensions, and the [`negotiate`]
//! middleware, which sees the request's `Accept`, writes it as XML (quick-xml's writer, namespace
//! on the root) or as JSON (attributes become properties, `Links` and other lists become arrays).
//! An error therefore renders exactly like an answer: `<Error Message=".." StatusCode="404"
//! Status="NotFound" />`, or `{"Message","StatusCode","Status"}`.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_types::Error;
use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// The namespace of every root element.
pub const NAMESPACE: &str = "http://www.veeam.com/ent/v1.0";

/// A value of an attribute or of a text-only element; its kind only matters in JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Text(String),
    Number(i64),
    Bool(bool),
}

impl Scalar {
    fn as_xml(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Number(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Scalar::Text(s.to_string())
    }
}
impl From<String> for Scalar {
    fn from(s: String) -> Self {
        Scalar::Text(s)
    }
}
impl From<i64> for Scalar {
    fn from(n: i64) -> Self {
        Scalar::Number(n)
    }
}
impl From<bool> for Scalar {
    fn from(b: bool) -> Self {
        Scalar::Bool(b)
    }
}

/// What an element holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Empty,
    Text(Scalar),
    /// Child elements, each with its own name (a JSON object).
    Children(Vec<Element>),
    /// Repeated child elements (a JSON array). At the root, the array is the property `json_key`.
    List {
        json_key: &'static str,
        items: Vec<Element>,
    },
}

/// One element of a representation, in document order.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    pub name: &'static str,
    pub attributes: Vec<(&'static str, Scalar)>,
    pub content: Content,
}

impl Element {
    pub fn new(name: &'static str) -> Element {
        Element { name, attributes: Vec::new(), content: Content::Empty }
    }
    pub fn attr(mut self, name: &'static str, value: impl Into<Scalar>) -> Element {
        self.attributes.push((name, value.into()));
        self
    }
    /// A text-only element, e.g. `<State>Stopped</State>`.
    pub fn text(name: &'static str, value: impl Into<Scalar>) -> Element {
        Element { name, attributes: Vec::new(), content: Content::Text(value.into()) }
    }
    /// Appends a child (the element becomes an object if it was empty).
    pub fn child(mut self, child: Element) -> Element {
        match &mut self.content {
            Content::Children(c) => c.push(child),
            _ => self.content = Content::Children(vec![child]),
        }
        self
    }
    pub fn child_opt(self, child: Option<Element>) -> Element {
        match child {
            Some(c) => self.child(c),
            None => self,
        }
    }
    /// An element whose children repeat: `Links`, `CloudFailoverTasks`, `EntityReferences`.
    pub fn list(name: &'static str, json_key: &'static str, items: Vec<Element>) -> Element {
        Element { name, attributes: Vec::new(), content: Content::List { json_key, items } }
    }

    /// The document: declaration-free, indented by two spaces, the namespace on the root.
    pub fn to_xml(&self) -> String {
        let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
        // Writing into a Vec cannot fail.
        let _ = write_xml(&mut writer, self, true);
        String::from_utf8(writer.into_inner()).unwrap_or_default()
    }

    /// The same document as JSON (see the `Serialize` impl), as a value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The JSON form, in document order: attributes then children are properties, text-only
/// elements are plain values, lists are arrays (at the root, the property `json_key`).
impl Serialize for Element {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.content {
            Content::List { json_key, items } => {
                let mut map = serializer.serialize_map(None)?;
                for (k, v) in &self.attributes {
                    map.serialize_entry(k, v)?;
                }
                map.serialize_entry(json_key, &items.iter().map(Inner).collect::<Vec<_>>())?;
                map.end()
            }
            _ => Inner(self).serialize(serializer),
        }
    }
}

/// An element inside a document.
struct Inner<'a>(&'a Element);

impl Serialize for Inner<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        match &e.content {
            Content::Text(s) if e.attributes.is_empty() => return s.serialize(serializer),
            Content::List { items, .. } if e.attributes.is_empty() => {
                return serializer.collect_seq(items.iter().map(Inner));
            }
            _ => {}
        }
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in &e.attributes {
            map.serialize_entry(k, v)?;
        }
        match &e.content {
            Content::Empty => {}
            Content::Text(s) => map.serialize_entry("Value", s)?,
            Content::Children(children) => {
                for c in children {
                    map.serialize_entry(c.name, &Inner(c))?;
                }
            }
            Content::List { json_key, items } => {
                map.serialize_entry(json_key, &items.iter().map(Inner).collect::<Vec<_>>())?
            }
        }
        map.end()
    }
}

impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Scalar::Text(s) => serializer.serialize_str(s),
            Scalar::Number(n) => serializer.serialize_i64(*n),
            Scalar::Bool(b) => serializer.serialize_bool(*b),
        }
    }
}

fn write_xml(writer: &mut Writer<Vec<u8>>, e: &Element, root: bool) -> std::io::Result<()> {
    let mut start = BytesStart::new(e.name);
    if root {
        start.push_attribute(("xmlns", NAMESPACE));
    }
    for (k, v) in &e.attributes {
        start.push_attribute((*k, v.as_xml().as_str()));
    }
    let children: &[Element] = match &e.content {
        Content::Empty => return writer.write_event(Event::Empty(start)),
        Content::Children(c) | Content::List { items: c, .. } if c.is_empty() => {
            return writer.write_event(Event::Empty(start));
        }
        Content::Text(s) => {
            writer.write_event(Event::Start(start))?;
            writer.write_event(Event::Text(BytesText::new(&s.as_xml())))?;
            return writer.write_event(Event::End(BytesEnd::new(e.name)));
        }
        Content::Children(c) | Content::List { items: c, .. } => c,
    };
    writer.write_event(Event::Start(start))?;
    for c in children {
        write_xml(writer, c, false)?;
    }
    writer.write_event(Event::End(BytesEnd::new(e.name)))
}

/// How to write a document, from the request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    Json,
}

impl Format {
    /// XML unless JSON is asked for (and XML is not preferred before it).
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Xml };
        for part in accept.split(',') {
            let media = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if media == "application/json" {
                return Format::Json;
            }
            if media == "application/xml" || media == "text/xml" {
                return Format::Xml;
            }
        }
        Format::Xml
    }

    pub fn render(self, e: &Element) -> (HeaderValue, Vec<u8>) {
        match self {
            Format::Xml => {
                // No XML declaration: the documented examples have none.
                (HeaderValue::from_static("application/xml; charset=utf-8"), e.to_xml().into_bytes())
            }
            Format::Json => {
                (HeaderValue::from_static("application/json; charset=utf-8"), serde_json::to_vec(e).unwrap_or_default())
            }
        }
    }
}

/// An answer waiting for [`negotiate`] to write it.
#[derive(Debug, Clone)]
struct Pending(Element);

/// A successful answer: a status, extra headers, and a document (or none, for 204).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    pub body: Option<Element>,
}

impl Reply {
    pub fn ok(body: Element) -> Reply {
        Reply { status: StatusCode::OK, headers: Vec::new(), body: Some(body) }
    }
    pub fn with_status(status: StatusCode, body: Element) -> Reply {
        Reply { status, headers: Vec::new(), body: Some(body) }
    }
    pub fn no_content() -> Reply {
        Reply::empty(StatusCode::NO_CONTENT)
    }
    /// A status with no body (an accepted edit: 202).
    pub fn empty(status: StatusCode) -> Reply {
        Reply { status, headers: Vec::new(), body: None }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut resp = self.status.into_response();
        for (k, v) in self.headers {
            resp.headers_mut().append(k, v);
        }
        if let Some(body) = self.body {
            resp.extensions_mut().insert(Pending(body));
        }
        resp
    }
}

/// Every failure of the dialect: a domain error, rendered as an `Error` document.
#[derive(Debug)]
pub struct EmError(pub Error);

impl From<Error> for EmError {
    fn from(e: Error) -> Self {
        EmError(e)
    }
}

pub type EmResult<T = Reply> = Result<T, EmError>;

/// The status of a domain error and its name in `Status`.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::AlreadyExists(_) | Error::Conflict(_) => StatusCode::CONFLICT,
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `NotFound`, `BadRequest`, ... : the reason phrase without spaces, as the product writes it.
pub fn status_name(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("Error").replace([' ', '-'], "")
}

/// The `Error` document.
pub fn error_element(status: StatusCode, message: &str) -> Element {
    Element::new("Error")
        .attr("Message", message)
        .attr("StatusCode", i64::from(status.as_u16()))
        .attr("Status", status_name(status))
}

impl IntoResponse for EmError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        // An internal error's chain is logged under a reference; the client gets the reference.
        let (message, retry_after) = drover_api::error::client_message(&self.0, "Enterprise Manager");
        let mut resp = status.into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic Realm=RestSvc"));
        }
        if let Some(after) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, after);
        }
        resp.extensions_mut().insert(Pending(error_element(status, &message)));
        resp
    }
}

/// The middleware that writes every pending document in the format the request asked for.
/// Answers that come from outside the dialect (axum's own 405, say) are rewritten as `Error`s.
pub async fn negotiate(request: Request, next: Next) -> Response {
    let format = Format::from_accept(request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut resp = next.run(request).await;
    let pending = match resp.extensions_mut().remove::<Pending>() {
        Some(Pending(e)) => Some(e),
        None if resp.status().is_client_error() || resp.status().is_server_error() => {
            let status = resp.status();
            let message = match status {
                StatusCode::METHOD_NOT_ALLOWED => "this resource does not take that method".to_string(),
                StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large".to_string(),
                _ => status.canonical_reason().unwrap_or("error").to_string(),
            };
            Some(error_element(status, &message))
        }
        None => None,
    };
    if let Some(element) = pending {
        let (content_type, bytes) = format.render(&element);
        let (mut parts, _) = resp.into_parts();
        parts.headers.insert(header::CONTENT_TYPE, content_type);
        parts.headers.remove(header::CONTENT_LENGTH);
        resp = Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_chooses_json_only_when_asked() {
        assert_eq!(Format::from_accept(None), Format::Xml);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Xml);
        assert_eq!(Format::from_accept(Some("application/json")), Format::Json);
        assert_eq!(Format::from_accept(Some("text/html, application/json;q=0.9")), Format::Json);
        assert_eq!(Format::from_accept(Some("application/xml, application/json")), Format::Xml);
    }

    #[test]
    fn errors_render_in_both_formats() {
        let e = error_element(StatusCode::NOT_FOUND, "plan x not found");
        assert_eq!(
            e.to_xml(),
            r#"<Error xmlns="http://www.veeam.com/ent/v1.0" Message="plan x not found" StatusCode="404" Status="NotFound"/>"#
        );
        assert_eq!(
            e.to_json(),
            serde_json::json!({"Message": "plan x not found", "StatusCode": 404, "Status": "NotFound"})
        );
        assert_eq!(status_name(StatusCode::BAD_REQUEST), "BadRequest");
    }

    #[test]
    fn an_internal_error_gives_the_client_a_reference_not_the_chain_and_a_503_a_retry_after() {
        let resp = EmError(Error::internal("store: no such table: sessions")).into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let Some(Pending(e)) = resp.extensions().get::<Pending>().cloned() else { panic!("no document") };
        let message = match &e.attributes[0] {
            ("Message", Scalar::Text(m)) => m.clone(),
            other => panic!("{other:?}"),
        };
        let reference = message.strip_prefix("internal error; reference ").expect(&message);
        assert!(uuid::Uuid::parse_str(reference).is_ok(), "{message}");
        assert!(!e.to_xml().contains("sessions"), "{}", e.to_xml());
        let resp = EmError(Error::Unavailable("busy".into())).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn text_is_escaped_not_concatenated() {
        let e = Element::new("A").attr("Name", "a \"b\" <c>").child(Element::text("B", "x & y"));
        let xml = e.to_xml();
        assert!(xml.contains(r#"Name="a &quot;b&quot; &lt;c&gt;""#), "{xml}");
        assert!(xml.contains("<B>x &amp; y</B>"), "{xml}");
    }
}
