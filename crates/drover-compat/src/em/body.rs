//! EM request bodies: JSON with `Content-Type: application/json`, XML otherwise, checked against
//! limits before any deserializer sees them.
//!
//! EM's bodies are a handful of elements (`CloudFailoverPlanManagementSpec`, `FailoverPlan`), so
//! the limits are far above anything real and far below what hurts: quick-xml's deserializer
//! checks an element's attributes for duplicates pairwise (80,000 attributes cost 19 s of CPU),
//! and every open element is kept on a stack. [`check_xml`] walks the document once, counting,
//! and stops at the first limit it crosses, so a hostile body costs one linear pass over at most
//! [`MAX_BODY_BYTES`]. JSON keeps serde_json's own recursion limit (128).

use drover_types::Error;

/// The largest request body, in bytes (also the router's body limit: a longer body is 413).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The deepest nesting of XML elements.
pub const MAX_XML_DEPTH: usize = 32;
/// The most attributes on one XML element.
pub const MAX_XML_ATTRIBUTES: usize = 32;
/// The most XML elements in one body.
pub const MAX_XML_ELEMENTS: usize = 1000;

/// Walks an XML document and returns the local name of its root, or what is wrong with it.
pub fn check_xml(text: &str) -> Result<String, String> {
    use quick_xml::events::Event;
    if text.len() > MAX_BODY_BYTES {
        return Err(format!("the body is longer than {MAX_BODY_BYTES} bytes"));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let (mut depth, mut elements) = (0usize, 0usize);
    let mut root = None;
    loop {
        let event = reader.read_event().map_err(|e| e.to_string())?;
        let (start, opens) = match &event {
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        elements += 1;
        if elements > MAX_XML_ELEMENTS {
            return Err(format!("more than {MAX_XML_ELEMENTS} elements"));
        }
        if depth + 1 > MAX_XML_DEPTH {
            return Err(format!("elements are nested more than {MAX_XML_DEPTH} deep"));
        }
        // Counted without quick-xml's duplicate check (quadratic); the deserializer that runs
        // afterwards checks duplicates among at most MAX_XML_ATTRIBUTES.
        if start.attributes().with_checks(false).take(MAX_XML_ATTRIBUTES + 1).count() > MAX_XML_ATTRIBUTES {
            let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
            return Err(format!("element {name} has more than {MAX_XML_ATTRIBUTES} attributes"));
        }
        if root.is_none() {
            root = Some(String::from_utf8_lossy(start.local_name().as_ref()).into_owned());
        }
        if opens {
            depth += 1;
        }
    }
    root.ok_or_else(|| "no root element".to_string())
}

/// A request body whose root must be `root` (the XML deserializer does not look at the root's
/// name; a client that sends another document by mistake must hear about it rather than have it
/// acted on). `None` for an empty body.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: &[u8],
    root: &str,
) -> Result<Option<T>, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = |e: String| Error::invalid(format!("malformed {root}: {e}"));
    if body.len() > MAX_BODY_BYTES {
        return Err(bad(format!("the body is longer than {MAX_BODY_BYTES} bytes")));
    }
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    if json {
        return serde_json::from_slice(body).map(Some).map_err(|e| bad(e.to_string()));
    }
    let text = std::str::from_utf8(body).map_err(|e| bad(e.to_string()))?;
    let found = check_xml(text).map_err(bad)?;
    if found != root {
        return Err(bad(format!("the root element is {found}, not {root}")));
    }
    quick_xml::de::from_str(text).map(Some).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    struct Spec {
        #[serde(rename = "StartNow", default)]
        start_now: Option<bool>,
    }

    fn xml(body: &str) -> Result<Option<Spec>, Error> {
        parse_body(&axum::http::HeaderMap::new(), body.as_bytes(), "Spec")
    }

    fn message(r: Result<Option<Spec>, Error>) -> String {
        match r {
            Err(Error::InvalidRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn ordinary_bodies_parse() {
        assert_eq!(xml("<Spec><StartNow>true</StartNow></Spec>").unwrap(), Some(Spec { start_now: Some(true) }));
        assert_eq!(xml("  \n").unwrap(), None);
        let at_limits = format!(
            "<Spec {}>{}{}</Spec>",
            (1..MAX_XML_ATTRIBUTES).map(|i| format!("a{i}=\"x\"")).collect::<Vec<_>>().join(" "),
            "<N>".repeat(MAX_XML_DEPTH - 1),
            "</N>".repeat(MAX_XML_DEPTH - 1),
        );
        assert_eq!(check_xml(&at_limits).unwrap(), "Spec");
        assert!(message(xml("<Other/>")).contains("the root element is Other, not Spec"));
    }

    #[test]
    fn deep_documents_stop_at_the_depth_limit() {
        let deep = |n: usize| format!("{}{}", "<Spec>".repeat(n), "</Spec>".repeat(n));
        assert!(check_xml(&deep(MAX_XML_DEPTH)).is_ok());
        assert!(message(xml(&deep(MAX_XML_DEPTH + 1))).contains("nested more than 32 deep"));
        // What an attacker sends: 100,000 levels, never closed or closed (within the size limit).
        let started = std::time::Instant::now();
        assert!(message(xml(&"<Spec>".repeat(100_000))).contains("nested more than 32 deep"));
        let closed = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
        assert!(message(xml(&closed)).contains("nested more than 32 deep"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[test]
    fn many_attributes_are_refused_before_the_pairwise_duplicate_check() {
        // Short names (hex) so that 100,000 of them fit in the body limit.
        let attrs = |n: usize| (0..n).map(|i| format!("a{i:x}=''")).collect::<Vec<_>>().join(" ");
        assert!(check_xml(&format!("<Spec {}/>", attrs(MAX_XML_ATTRIBUTES))).is_ok());
        let m = message(xml(&format!("<Spec {}/>", attrs(MAX_XML_ATTRIBUTES + 1))));
        assert!(m.contains("element Spec has more than 32 attributes"), "{m}");
        // 100,000 attributes on one element: 19 s of quick-xml's duplicate check before this
        // limit; a linear scan of the first 33 with it.
        let started = std::time::Instant::now();
        let m = message(xml(&format!("<Spec><StartNow {}/></Spec>", attrs(100_000))));
        assert!(m.contains("element StartNow has more than 32 attributes"), "{m}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[test]
    fn element_count_and_size_are_limited() {
        let many = format!("<Spec>{}</Spec>", "<StartNow>true</StartNow>".repeat(MAX_XML_ELEMENTS));
        assert!(message(xml(&many)).contains("more than 1000 elements"));
        let fits = format!("<Spec>{}</Spec>", "<X/>".repeat(MAX_XML_ELEMENTS - 1));
        assert!(check_xml(&fits).is_ok());
        let big = format!("<Spec><StartNow>true</StartNow><!--{}--></Spec>", "x".repeat(MAX_BODY_BYTES));
        assert!(message(xml(&big)).contains("longer than 1048576 bytes"));
        let big_json = format!("{{\"StartNow\": true, \"pad\": \"{}\"}}", "x".repeat(MAX_BODY_BYTES));
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::CONTENT_TYPE, "application/json".parse().unwrap());
        let r: Result<Option<Spec>, Error> = parse_body(&headers, big_json.as_bytes(), "Spec");
        assert!(message(r).contains("longer than"));
    }

    #[test]
    fn deep_json_is_refused_by_serde_json_not_the_stack() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::CONTENT_TYPE, "application/json".parse().unwrap());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let r: Result<Option<serde_json::Value>, Error> = parse_body(&headers, deep.as_bytes(), "Spec");
        assert!(matches!(&r, Err(Error::InvalidRequest(m)) if m.contains("recursion limit")), "{r:?}");
    }
}
