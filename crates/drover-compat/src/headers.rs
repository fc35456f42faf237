//! `Content-Type` and `Content-Length` on every answer of both dialects.
//!
//! The products document both headers on every response (seed 000 lists them for an action whose
//! body is empty), and clients written against them read the body by `Content-Length` and parse
//! it by `Content-Type`. Handlers of the dialects set a type when they write a document; this
//! layer, the outermost of each dialect's router, fills in the rest:
//!
//! - a response without `Content-Type` gets the dialect's type for the request (JSON for the
//!   Recovery Orchestrator; for Enterprise Manager the format its `Accept` chose), empty bodies
//!   included: `application/json` with `Content-Length: 0` is what a client of an action sees;
//! - a body whose length is not known ahead (a streamed one) is buffered, up to
//!   [`MAX_BUFFERED_BYTES`], so that its length can be sent; a longer one is passed on as a stream,
//!   the buffered part first (the dialects write no such body);
//! - 204 and 304 answers carry neither a body nor `Content-Length` nor `Content-Type`: RFC 9110
//!   (8.6) forbids a server to send `Content-Length` on them, and there is no content to type.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use http_body::Body as _;

/// The longest body buffered to learn its length.
pub const MAX_BUFFERED_BYTES: usize = 16 << 20;

/// The `Content-Type` a dialect gives an answer that has none, from the request's headers.
pub type DefaultContentType = fn(&HeaderMap) -> HeaderValue;

/// The middleware (`axum::middleware::from_fn_with_state(default_type, complete)`).
pub async fn complete(State(default_type): State<DefaultContentType>, req: Request, next: Next) -> Response {
    let content_type = default_type(req.headers());
    let head = req.method() == Method::HEAD;
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    if parts.status.is_informational() || matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_TYPE);
        return Response::from_parts(parts, Body::empty());
    }
    parts.headers.entry(header::CONTENT_TYPE).or_insert(content_type);
    if head || parts.headers.contains_key(header::CONTENT_LENGTH) {
        // A HEAD answer's length is that of the GET's body, already set by the router.
        return Response::from_parts(parts, body);
    }
    if let Some(n) = body.size_hint().exact() {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        return Response::from_parts(parts, body);
    }
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut length = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                length += chunk.len();
                chunks.push(chunk);
                if length > MAX_BUFFERED_BYTES {
                    let buffered = futures::stream::iter(chunks.into_iter().map(Ok::<_, axum::Error>));
                    return Response::from_parts(parts, Body::from_stream(buffered.chain(stream)));
                }
            }
            Err(e) => {
                // The body failed part-way: pass on what came, then the failure.
                let buffered = futures::stream::iter(chunks.into_iter().map(Ok));
                return Response::from_parts(parts, Body::from_stream(buffered.chain(futures::stream::iter([Err(e)]))));
            }
        }
    }
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Response::from_parts(parts, Body::from(chunks.concat()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    fn json(_: &HeaderMap) -> HeaderValue {
        HeaderValue::from_static("application/json")
    }

    fn streamed(parts: &'static [&'static str]) -> Body {
        Body::from_stream(futures::stream::iter(parts.iter().map(|p| Ok::<_, std::io::Error>(Bytes::from(*p)))))
    }

    async fn answer(router: Router, method: Method) -> Response {
        // Around the whole router, as the listener serves it.
        let service =
            tower::Layer::layer(&axum::middleware::from_fn_with_state(json as DefaultContentType, complete), router);
        service.oneshot(Request::builder().method(method).uri("/").body(Body::empty()).unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn a_streamed_body_is_buffered_and_measured_and_an_empty_one_typed() {
        let resp = answer(Router::new().route("/", get(|| async { streamed(&["{\"a\":", "1}"]) })), Method::GET).await;
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "7");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 10).await.unwrap();
        assert_eq!(&body[..], b"{\"a\":1}");

        let resp = answer(Router::new().route("/", get(|| async { StatusCode::OK })), Method::GET).await;
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "0");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn a_type_the_handler_chose_is_kept_and_204_has_no_content_headers() {
        let typed = || async { ([(header::CONTENT_TYPE, "application/xml")], "<A/>") };
        let resp = answer(Router::new().route("/", get(typed)), Method::GET).await;
        assert_eq!(
            (
                resp.headers()[header::CONTENT_TYPE].to_str().unwrap(),
                resp.headers()[header::CONTENT_LENGTH].to_str().unwrap()
            ),
            ("application/xml", "4")
        );
        let no_content = || async { ([(header::CONTENT_TYPE, "text/plain")], StatusCode::NO_CONTENT) };
        let resp = answer(Router::new().route("/", get(no_content)), Method::GET).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert!(
            resp.headers().get(header::CONTENT_TYPE).is_none() && resp.headers().get(header::CONTENT_LENGTH).is_none()
        );
    }

    #[tokio::test]
    async fn a_body_longer_than_the_bound_is_streamed_whole() {
        static BIG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "x".repeat(MAX_BUFFERED_BYTES / 2 + 1));
        let resp = answer(
            Router::new().route(
                "/",
                get(|| async {
                    Body::from_stream(futures::stream::iter(
                        (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(BIG.as_bytes()))),
                    ))
                }),
            ),
            Method::GET,
        )
        .await;
        assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        assert_eq!(body.len(), 3 * BIG.len());
    }
}
