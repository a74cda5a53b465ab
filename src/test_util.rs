//! Helpers shared by the unit tests of several modules (test builds only).

use std::sync::Arc;

use crate::node::Node;

/// `GET /healthz` on the node's admin router: status and body.
pub(crate) async fn health(node: &Arc<Node>) -> (u16, String) {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .uri("/healthz")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = crate::admin::router(node.clone(), None)
        .oneshot(req)
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The node's `/metrics` text, as the admin API renders it.
pub(crate) async fn metrics(node: &Arc<Node>) -> String {
    crate::admin::metrics::render(&node.snapshot())
}
