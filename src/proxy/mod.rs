//! The data plane: one plain async function from a client's request to its response.
//!
//! In order: refuse ambiguous paths and method overrides, route, and then either pass the request
//! through (an unfenced read) or fence it: parse the token, let the [`Gate`] admit it, forward it
//! while holding the gate's permit, and settle the permit once the upstream has answered. Every
//! refusal on fencing grounds is committed to the audit log before the answer goes out.

mod headers;
mod inflight;
pub mod placement;
pub mod request_id;
mod upstream;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};

use crate::audit::{self, Reason, Rejection};
use crate::gate::{Gate, Permits, Refusal, RefusedBy};
use crate::metrics::Metrics;
use crate::problem::{self, FencingContext, ProxyError, Rejected};
use crate::profile::webdav::{self, Destination};
use crate::profile::{Changes, KeyApi, Profile, ProfileError, RequestHead};
use crate::route::request_parts::PartError;
use crate::route::{self, Fencing, Resolved, ResourceKey, Route, RouteTable, methods};
use crate::server::{ClientBody, ClientRequest};
use crate::store::SharedStore;
use crate::tls::ClientIdentity;
use crate::token::{self, FENCING_TOKEN_HIGHEST, FencingToken, TokenError};
use inflight::InFlight;
use placement::{Admissions, ClusterPlane, Placed, until_term_ends};
use request_id::X_REQUEST_ID;

pub use upstream::{
    ExchangeError, ForwardError, HandshakeFailure, ResponseBody, TlsClientFiles, Upstream,
    UpstreamClient, UpstreamUrlError, wire,
};

/// A response body: streamed from the upstream, or one of fencegate's own problem documents.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The data plane's limits on what one request may name and make it read.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_resource_len: usize,
    pub max_inspect_body: u64,
    pub max_resources_per_request: usize,
}

/// Everything the data plane needs to serve a request.
#[derive(Debug)]
pub struct DataPlane {
    routes: Arc<RouteTable>,
    /// The longest resource name a request may render (`max_resource_len`).
    max_resource_len: usize,
    /// The most of a body a profile reads before the gate (`max_inspect_body`).
    max_inspect_body: u64,
    /// The most resources one request may change (`max_resources_per_request`).
    max_resources_per_request: usize,
    gate: Gate,
    store: SharedStore,
    upstream: UpstreamClient,
    metrics: Arc<Metrics>,
    /// Whether every request gets a line in the access log.
    access_log: bool,
    /// Cluster mode: which replica serves each shard.
    cluster: Option<Arc<ClusterPlane>>,
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client, on the data plane.
    Client,
    /// Another replica, on the peer plane (cluster mode): authenticated by the cluster secret,
    /// and served here or refused, never forwarded again.
    Peer,
}

/// Marks a request that came over the peer plane (in its extensions).
#[derive(Debug, Clone, Copy)]
struct FromPeer;

/// What the access log says of a forwarded fenced request, carried in its response's extensions
/// (only while the access log is on).
#[derive(Debug, Clone)]
struct Fenced {
    resource: ResourceKey,
    token: FencingToken,
}

impl DataPlane {
    /// Assembles the data plane.
    pub fn new(
        routes: RouteTable,
        limits: RequestLimits,
        gate: Gate,
        store: SharedStore,
        upstream: UpstreamClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            routes: Arc::new(routes),
            max_resource_len: limits.max_resource_len,
            max_inspect_body: limits.max_inspect_body,
            max_resources_per_request: limits.max_resources_per_request,
            gate,
            store,
            upstream,
            metrics,
            access_log: false,
            cluster: None,
        }
    }

    /// The same data plane in cluster mode: fenced requests are served on the replica that
    /// holds their shard's lease.
    pub fn with_cluster(mut self, cluster: Arc<ClusterPlane>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The same data plane, logging one line per request if `on`.
    pub fn with_access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// The same data plane for another thread: routes, gate and store shared. Upstream
    /// connections are each thread's own (a thread-local pool).
    pub fn for_thread(&self) -> DataPlane {
        DataPlane {
            routes: Arc::clone(&self.routes),
            max_resource_len: self.max_resource_len,
            max_inspect_body: self.max_inspect_body,
            max_resources_per_request: self.max_resources_per_request,
            gate: self.gate.clone(),
            store: self.store.clone(),
            upstream: self.upstream.clone(),
            metrics: Arc::clone(&self.metrics),
            access_log: self.access_log,
            cluster: self.cluster.clone(),
        }
    }

    /// Serves one request from `client`. Never fails: every error becomes a problem+json answer.
    ///
    /// `id` is the request's `X-Request-Id` (the server sets one if the client sent none), passed
    /// on beside the request: looking it up again is a custom name hashed byte by byte.
    pub async fn handle(
        &self,
        mut request: ClientRequest,
        mut client: SocketAddr,
        origin: Origin,
        id: &HeaderValue,
    ) -> Response<ProxyBody> {
        let body_may_be_unread = has_body(&request) && request.version() <= Version::HTTP_11;
        let method = request.method().clone();
        let access = self.access_log.then(|| AccessStart::of(&request));
        let mut fencing = None;
        let accepted = match origin {
            Origin::Client => Ok(()),
            Origin::Peer => self.accept_from_peer(&mut request).map(|original| {
                client = original.unwrap_or(client);
            }),
        };
        let served = match accepted {
            Ok(()) => self.serve(request, client, id).await,
            Err(unauthenticated) => Err(unauthenticated),
        };
        let mut response = match served {
            Ok(response) => response.map(Either::Left),
            Err(rejected) => {
                if access.is_some() {
                    fencing = rejected
                        .fencing
                        .as_ref()
                        .map(|context| (context.resource.clone(), context.token));
                }
                let mut response = rejected.into_response();
                // fencegate answers its own errors without reading the request body, and HTTP/1
                // cannot reuse a connection whose body was left unread. fencegate's own HTTP/1.1
                // server says so itself (`server::http1`), but hyper's (TLS) writes the head
                // first and closes the connection without a word, and the client's next request
                // on it would hit a closed socket. A zombie's body is not worth reading.
                if body_may_be_unread {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response.map(Either::Right)
            }
        };
        if let Some(cluster) = &self.cluster {
            // An answer relayed from the owner already names it.
            response
                .headers_mut()
                .entry(headers::FENCEGATE_REPLICA)
                .or_insert_with(|| cluster.replica().clone());
        }
        tracing::debug!(%method, status = response.status().as_u16(), %client, "answered");
        if let Some(access) = access {
            // The log reads the answer's `Content-Length`.
            if crate::verbatim::into_map(&mut response).is_err() {
                tracing::debug!("an upstream header is not valid HTTP; written as it came");
            }
            access.log(&response, fencing, client);
        }
        response
    }

    /// Checks a request that came over the peer plane: the cluster secret, then the client's
    /// own address, which the forwarding replica sent. The peer headers go no further.
    fn accept_from_peer(
        &self,
        request: &mut Request<ClientBody>,
    ) -> Result<Option<SocketAddr>, Rejected> {
        let headers = request.headers_mut();
        let secret = headers.remove(headers::FENCEGATE_CLUSTER_SECRET);
        let original = placement::peer_client(headers.get(headers::FENCEGATE_CLIENT));
        headers.remove(headers::FENCEGATE_CLIENT);
        let identity = headers
            .remove(headers::FENCEGATE_CLIENT_IDENTITY)
            .and_then(|value| ClientIdentity::from_header(&value));
        // Over `[cluster.peer_tls]` the connection's own certificate is the forwarding
        // replica's: the client's identity is the one it sent on, or none.
        request.extensions_mut().remove::<Arc<ClientIdentity>>();
        match &self.cluster {
            Some(cluster) if cluster.authenticates(secret.as_ref()) => {
                request.extensions_mut().insert(FromPeer);
                if let Some(identity) = identity {
                    request.extensions_mut().insert(identity);
                }
                Ok(original)
            }
            _ => Err(ProxyError::PeerUnauthenticated.into()),
        }
    }

    /// Cluster mode: where a fenced request changing `resources` is served. On a single node,
    /// always here, with nothing to hold.
    async fn place<B>(
        &self,
        resources: &[&ResourceKey],
        request: &Request<B>,
    ) -> Result<Placed, Rejected> {
        let Some(cluster) = &self.cluster else {
            return Ok(Placed::Here(Admissions::new()));
        };
        let from_peer = request.extensions().get::<FromPeer>().is_some();
        if let Some(placed) = cluster.place_now(resources, from_peer) {
            return placed.map_err(Rejected::from);
        }
        Box::pin(cluster.place(resources, from_peer, self.upstream.timeout()))
            .await
            .map_err(Rejected::from)
    }

    /// Relays a request to the replica that owns its shard, and its answer back. An owner that
    /// does not answer (gone, paused, cut off) is a 503 to retry, not a failure of the storage.
    async fn forward_to_owner(
        &self,
        (replica, peer): (String, Arc<Upstream>),
        request: ClientRequest,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, Rejected> {
        self.metrics.peer_forwarded();
        let secret = self.cluster.as_ref().and_then(|cluster| cluster.secret());
        self.upstream
            .forward_to_peer(&peer, secret, request, client)
            .await
            .map_err(|e| {
                tracing::warn!(owner = %replica, peer = %peer, cause = e.cause(), error = %e, "the shard's owner did not answer over the peer plane");
                ProxyError::OwnerUnreachable {
                    replica,
                    cause: e.cause(),
                }
                .into()
            })
    }

    async fn serve(
        &self,
        request: ClientRequest,
        client: SocketAddr,
        id: &HeaderValue,
    ) -> Result<Response<ResponseBody>, Rejected> {
        if let Some(registered) = methods::case_variant_of(request.method()) {
            return Err(ProxyError::MethodCase {
                sent: audit::truncated(request.method().as_str(), audit::MAX_AUDITED_METHOD),
                registered,
            }
            .into());
        }
        headers::refuse_hop_by_hop_fencing_headers(request.headers(), None)?;
        // A handle on the request's path (a reference count, not a copy): the path is borrowed
        // below while the request moves on.
        let target = request.uri().path_and_query().cloned();
        let path = route::normalise_path(target.as_ref().map_or("", PathAndQuery::path))
            .map_err(ProxyError::from)?;
        let resolved = self
            .routes
            .resolve(&path)
            .ok_or_else(|| ProxyError::NoRoute {
                path: request.uri().path().to_owned(),
            })?;
        let token_header = resolved.route.token_header();
        if *token_header != token::FENCING_TOKEN {
            headers::refuse_hop_by_hop_fencing_headers(request.headers(), Some(token_header))?;
        }
        if let Some(Profile::Keys(api)) = resolved.route.profile() {
            // Boxed, here and on every refusal below: a branch's future is laid out inside its
            // caller's, and the hot path's futures are copied at every `.await` they pass
            // through; the rare branches would make each copy larger.
            return Box::pin(self.serve_profiled(&path, resolved, api, request, client, id)).await;
        }
        let writes = match resolved.route.fencing_for(request.method()) {
            Fencing::Required => true,
            Fencing::IfPresent => request
                .headers()
                .contains_key(resolved.route.token_header()),
            Fencing::Off => false,
        };
        // A Destination is a second path the request writes, whatever its method.
        let fenced = writes || request.headers().contains_key(webdav::DESTINATION);
        if fenced && resolved.route.reads_request() && !allows(resolved.route, &request) {
            // Before the body is read for a resource: a client that may not write here gets
            // nothing read on its behalf. After the checks of a malformed request, which come
            // first; audited under the path's resource. (Other routes check in `serve_fenced`.)
            headers::refuse_method_override(request.headers())?;
            self.check_resource_length(&resolved.resource)?;
            let Resolved {
                route, resource, ..
            } = resolved;
            return Box::pin(self.refuse_forbidden(route, resource, request, client)).await;
        }
        if fenced && resolved.route.reads_request() {
            let (resolved, request) =
                Box::pin(self.resolve_from_request(&path, resolved, request, client)).await?;
            self.serve_fenced(&path, resolved, request, client, id)
                .await
        } else if fenced {
            self.serve_fenced(&path, resolved, request, client, id)
                .await
        } else {
            headers::refuse_method_override(request.headers())?;
            self.check_declared_length(&request)?;
            self.forward_unfenced(resolved.route, request, client, id)
                .await
        }
    }

    async fn forward_unfenced(
        &self,
        route: &Route,
        request: ClientRequest,
        client: SocketAddr,
        id: &HeaderValue,
    ) -> Result<Response<ResponseBody>, Rejected> {
        self.metrics.forwarded(false);
        let call = self.metrics.upstream_call();
        self.upstream
            .forward(route, request, client, None, call.started().into())
            .await
            .map_err(|e| self.forward_failure(e, route, Some(id)).into())
    }

    /// The phases of a fenced request: edge checks, collection check, token, gate, upstream.
    ///
    /// No `tracing::instrument` span here or below: even disabled, it wraps the body in one more
    /// future layer, and that layer was copied whole on every request (a 3.8 KB memmove,
    /// measured with a uprobe). The log lines on this path name their resource themselves.
    async fn serve_fenced(
        &self,
        path: &str,
        resolved: Resolved<'_>,
        mut request: ClientRequest,
        client: SocketAddr,
        id: &HeaderValue,
    ) -> Result<Response<ResponseBody>, Rejected> {
        self.check_resource_length(&resolved.resource)?;
        let destination = match self.edge_checks(&resolved, &mut request) {
            Ok(destination) => destination,
            Err(error) => {
                let resource = resolved.resource.clone();
                return Err(Box::pin(self.refuse_malformed(error, resource)).await);
            }
        };
        if !allows(resolved.route, &request) {
            let resource = resolved.resource.clone();
            return Box::pin(self.refuse_forbidden(resolved.route, resource, request, client))
                .await;
        }
        // Cluster mode only: a single node serves everything here, and the hot path allocates
        // nothing for it.
        let admissions = if self.cluster.is_some() {
            let primary = &resolved.resource;
            let both;
            let resources: &[&ResourceKey] = match &destination {
                None => std::slice::from_ref(&primary),
                Some(d) => {
                    both = [primary, &d.resolved.resource];
                    &both
                }
            };
            match self.place(resources, &request).await? {
                Placed::Here(admissions) => admissions,
                Placed::Owner(replica, peer) => {
                    return Box::pin(self.forward_to_owner((replica, peer), request, client)).await;
                }
            }
        } else {
            Admissions::new()
        };
        let conflict = webdav::collection_conflict(
            &self.routes,
            request.method(),
            path,
            &resolved,
            destination.as_ref(),
        );
        if let Some(conflict) = conflict {
            let error = ProxyError::Collection {
                path: conflict.path,
                below: conflict.below,
            };
            return Err(Box::pin(self.refuse_collection(
                error,
                conflict.resource,
                resolved.route.token_header(),
                &request,
                client,
            ))
            .await);
        }
        // From here on only the route and the resource are needed: moved out, not cloned.
        let Resolved {
            route, resource, ..
        } = resolved;
        let token = match token::from_header(request.headers(), route.token_header()) {
            Ok(token) => token,
            Err(e) => {
                return Err(Box::pin(self.refuse_unparsed(resource, e, &request, client)).await);
            }
        };
        if let Err(error) = self.check_declared_length(&request) {
            let highest = Box::pin(self.gate.highest(&resource)).await.ok().flatten();
            return Err(fenced(error, resource, Some(token), highest));
        }
        let also = destination
            .as_ref()
            .map(|d| std::slice::from_ref(&d.resolved.resource));
        let admitted = self
            .gate
            .admit_all(
                &resource,
                also.unwrap_or_default(),
                token,
                max_jump(route, destination.as_ref()),
                id_text(Some(id)),
            )
            .await;
        let permits = match admitted {
            Ok(permits) => permits,
            Err(refused) => {
                return Err(Box::pin(self.refuse(refused, token, &request, client)).await);
            }
        };
        self.forward_with(
            &admissions,
            permits,
            route,
            resource,
            token,
            request,
            id,
            client,
        )
        .await
    }

    /// A request on a route with a storage profile: the profile says what it changes, reading the
    /// body first where the resources are in it (up to `max_inspect_body`); every other body
    /// streams. Then, as for any fenced request: token, every resource's gate, upstream.
    async fn serve_profiled(
        &self,
        path: &str,
        resolved: Resolved<'_>,
        profile: &KeyApi,
        request: ClientRequest,
        client: SocketAddr,
        id: &HeaderValue,
    ) -> Result<Response<ResponseBody>, Rejected> {
        headers::refuse_method_override(request.headers())?;
        let (request, changes) = if profile.needs_body(&head_of(&request, path)) {
            let (request, body) = self.read_for_inspection(request).await?;
            let changes = profile
                .changes(&head_of(&request, path), &body)
                .map_err(ProxyError::from)?;
            (request, changes)
        } else {
            let changes = profile
                .changes(&head_of(&request, path), &[])
                .map_err(ProxyError::from)?;
            (request, changes)
        };
        let resources = match changes {
            Changes::ReadsOnly => {
                self.check_declared_length(&request)?;
                return self
                    .forward_unfenced(resolved.route, request, client, id)
                    .await;
            }
            Changes::Unattributable(why) => {
                if !allows(resolved.route, &request) {
                    let route_resource = resolved.resource;
                    return Box::pin(self.refuse_forbidden(
                        resolved.route,
                        route_resource,
                        request,
                        client,
                    ))
                    .await;
                }
                // Audited under the route's resource, by the replica that holds its shard.
                if let Placed::Owner(replica, peer) =
                    self.place(&[&resolved.resource], &request).await?
                {
                    return self
                        .forward_to_owner((replica, peer), request, client)
                        .await;
                }
                let header = resolved.route.token_header();
                return Err(self
                    .refuse_unattributable(why, resolved.resource, header, &request, client)
                    .await);
            }
            Changes::Resources(resources) => resources,
            // Only WebDAV answers with the path, and its routes are served by `serve_fenced`.
        };
        if resources.len() > self.max_resources_per_request {
            return Err(ProxyError::TooManyResources {
                count: resources.len(),
                limit: self.max_resources_per_request,
            }
            .into());
        }
        for resource in &resources {
            self.check_resource_length(resource)?;
        }
        // A profile names at least one resource for a write; were it ever to name none, the
        // request is refused, never forwarded unfenced.
        let Some((primary, also)) = resources.split_first() else {
            let why = "the storage profile named no resource".to_owned();
            return Err(ProxyError::Unattributable(why).into());
        };
        if !allows(resolved.route, &request) {
            let primary = primary.clone();
            return Box::pin(self.refuse_forbidden(resolved.route, primary, request, client)).await;
        }
        let admissions = match self
            .place(&resources.iter().collect::<Vec<_>>(), &request)
            .await?
        {
            Placed::Here(admissions) => admissions,
            Placed::Owner(replica, peer) => {
                return self
                    .forward_to_owner((replica, peer), request, client)
                    .await;
            }
        };
        let token = match token::from_header(request.headers(), resolved.route.token_header()) {
            Ok(token) => token,
            Err(e) => {
                return Err(self
                    .refuse_unparsed(primary.clone(), e, &request, client)
                    .await);
            }
        };
        if let Err(error) = self.check_declared_length(&request) {
            let highest = self.gate.highest(primary).await.ok().flatten();
            return Err(fenced(error, primary.clone(), Some(token), highest));
        }
        let admitted = self
            .gate
            .admit_all(
                primary,
                also,
                token,
                resolved.route.max_token_jump(),
                id_text(Some(id)),
            )
            .await;
        let permits = match admitted {
            Ok(permits) => permits,
            Err(refused) => return Err(self.refuse(refused, token, &request, client).await),
        };
        self.forward_with(
            &admissions,
            permits,
            resolved.route,
            primary.clone(),
            token,
            request,
            id,
            client,
        )
        .await
    }

    /// The resource of a fenced request on a route whose template reads the query, a header or
    /// the body (read first, up to `max_inspect_body`). A value that is not there makes the
    /// request unattributable (422, audited under the route's path-only resource); one that is
    /// ambiguous or malformed is a 400.
    async fn resolve_from_request<'r>(
        &self,
        path: &str,
        mut resolved: Resolved<'r>,
        request: ClientRequest,
        client: SocketAddr,
    ) -> Result<(Resolved<'r>, ClientRequest), Rejected> {
        headers::refuse_method_override(request.headers())?;
        let (request, bytes) = if resolved.route.reads_body() {
            self.read_for_inspection(request).await?
        } else {
            (request, Bytes::new())
        };
        let rendered = resolved
            .route
            .resource_for_request(&head_of(&request, path), &bytes);
        let why = match rendered {
            Ok(resource) => {
                resolved.resource = resource;
                if request.headers().contains_key(webdav::DESTINATION) {
                    "a Destination on a route whose resource comes from the request".to_owned()
                } else {
                    return Ok((resolved, request));
                }
            }
            Err(PartError::Missing(why)) => why,
            Err(PartError::Malformed(why)) => {
                return Err(ProxyError::from(ProfileError::Header(why)).into());
            }
        };
        let header = resolved.route.token_header();
        Err(self
            .refuse_unattributable(why, resolved.resource, header, &request, client)
            .await)
    }

    /// Reads the body of a request a profile names resources from, up to `max_inspect_body`
    /// (413 over it): the request comes back with that body to send on, and the bytes read.
    async fn read_for_inspection(
        &self,
        mut request: ClientRequest,
    ) -> Result<(ClientRequest, Bytes), ProxyError> {
        let too_large = ProxyError::BodyTooLarge {
            limit: self.max_inspect_body,
        };
        if declared_length(&request).is_some_and(|length| length > self.max_inspect_body) {
            return Err(too_large);
        }
        let limit = usize::try_from(self.max_inspect_body).unwrap_or(usize::MAX);
        let body = std::mem::replace(request.body_mut(), ClientBody::Empty);
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return Err(too_large),
            Err(_) => return Err(ProxyError::BodyUnreadable),
        };
        *request.body_mut() = ClientBody::Read(Full::new(bytes.clone()));
        Ok((request, bytes))
    }

    /// A fenced request from a client the route's `allow` list does not name: 403, audited under
    /// `resource` with the client's identity. In cluster mode the replica that owns `resource`
    /// writes the row: the request is relayed there with the identity, and refused there.
    async fn refuse_forbidden(
        &self,
        route: &Route,
        resource: ResourceKey,
        request: ClientRequest,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, Rejected> {
        if let Placed::Owner(replica, peer) = self.place(&[&resource], &request).await? {
            return self
                .forward_to_owner((replica, peer), request, client)
                .await;
        }
        let token = token::from_header(request.headers(), route.token_header()).ok();
        let highest = match self.gate.highest(&resource).await {
            Ok(highest) => highest,
            Err(e) => {
                tracing::error!(%resource, error = %e, "cannot read the highest token");
                return Err(fenced(ProxyError::StoreUnavailable, resource, token, None));
            }
        };
        let error = ProxyError::Forbidden {
            identity: identity_of(&request).map(ToString::to_string),
            route: route.path().to_owned(),
        };
        let fencing = FencingContext {
            resource,
            token,
            highest,
        };
        Err(self
            .audit(Reason::Forbidden, error, fencing, &request, client)
            .await)
    }

    /// A state-changing request its profile cannot attribute to a finite set of resources:
    /// refused and audited under `route_resource`, the resource that stands for its route.
    async fn refuse_unattributable<B>(
        &self,
        why: String,
        route_resource: ResourceKey,
        token_header: &HeaderName,
        request: &Request<B>,
        client: SocketAddr,
    ) -> Rejected {
        let fencing = FencingContext {
            resource: route_resource,
            token: token::from_header(request.headers(), token_header).ok(),
            highest: None,
        };
        let error = ProxyError::Unattributable(why);
        self.audit(Reason::Unattributable, error, fencing, request, client)
            .await
    }

    /// The checks of a fenced request that need no fencing state: a method override and, for a
    /// COPY or MOVE, its Destination, which is routed like a path and rewritten so that the
    /// upstream reads exactly the path that was fenced.
    fn edge_checks<'a, B>(
        &'a self,
        source: &Resolved<'_>,
        request: &mut Request<B>,
    ) -> Result<Option<Destination<'a>>, ProxyError> {
        headers::refuse_method_override(request.headers())?;
        // Looked up only for a request with a Destination, which is resolved against it.
        let authority = || request_authority(request);
        let Some(destination) =
            webdav::destination(&self.routes, source, request.headers(), authority)?
        else {
            return Ok(None);
        };
        self.check_resource_length(&destination.resolved.resource)?;
        request
            .headers_mut()
            .insert(webdav::DESTINATION, destination.rewritten.clone());
        Ok(Some(destination))
    }

    /// Refuses a resource name longer than `max_resource_len`: before the gate, so that it never
    /// reaches memory or the database.
    fn check_resource_length(&self, resource: &ResourceKey) -> Result<(), ProxyError> {
        let length = resource.as_str().len();
        if length > self.max_resource_len {
            return Err(ProxyError::ResourceTooLong {
                length,
                limit: self.max_resource_len,
            });
        }
        Ok(())
    }

    /// Forwards while holding the permits. They are settled once the upstream has answered and the
    /// request body has been sent in full (see [`inflight`]); a failure after the request may have
    /// reached the upstream leaves them unsettled, which keeps newer tokens back for the in-doubt
    /// grace.
    ///
    /// In cluster mode, `admissions` are the terms the request was admitted under: it is sent only
    /// if each may still start it (it may have waited in the gate since, or the whole process may
    /// have been stopped), and torn down if one ends before the upstream has answered. The race
    /// is here, around the upstream call, rather than a layer of its own around this future: that
    /// layer had to be boxed to keep a single node's future small, and it cost the owner an
    /// allocation and a copy of the whole future per request.
    ///
    /// `id` is the request's `X-Request-Id`, for a failure's log line.
    #[allow(clippy::too_many_arguments)]
    async fn forward_with(
        &self,
        admissions: &[placement::Admission],
        permits: Permits,
        route: &Route,
        resource: ResourceKey,
        token: FencingToken,
        request: ClientRequest,
        id: &HeaderValue,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, Rejected> {
        if let Some(late) = admissions.iter().find(|admission| !admission.in_time()) {
            // Nothing was sent: the permits go back settled.
            permits.settle();
            return Err(ProxyError::LeaseEnded { shard: late.shard }.into());
        }
        self.metrics.forwarded(true);
        let call = self.metrics.upstream_call();
        let terms = admissions
            .iter()
            .map(placement::Admission::window)
            .collect();
        let in_flight = InFlight::new(permits, terms);
        let upstream = pin!(self.upstream.forward(
            route,
            request,
            client,
            Some(&in_flight),
            call.started().into()
        ));
        let forwarded = match until_term_ends(admissions, upstream).await {
            Ok(forwarded) => forwarded,
            // Torn down: the permits stay in doubt.
            Err(shard) => return Err(ProxyError::LeaseEnded { shard }.into()),
        };
        drop(call);
        match forwarded {
            Ok(mut response) => {
                let highest = in_flight.answered();
                response
                    .headers_mut()
                    .insert(FENCING_TOKEN_HIGHEST, problem::highest_header(highest));
                if self.access_log {
                    response.extensions_mut().insert(Fenced { resource, token });
                }
                Ok(response)
            }
            Err(e) if e.lease_ended() => {
                // A term ran out between two writes: what was written (if anything) stays in
                // doubt, as after a teardown.
                if e.never_sent() {
                    in_flight.never_sent();
                }
                let shard = admissions
                    .iter()
                    .find(|admission| !admission.in_time())
                    .or(admissions.first())
                    .map_or(0, |admission| admission.shard);
                Err(ProxyError::LeaseEnded { shard }.into())
            }
            Err(e) => {
                let highest = match e {
                    _ if e.never_sent() => in_flight.never_sent(),
                    // The upstream answered; refusing its answer changes nothing it applied.
                    ForwardError::SwitchedProtocols => in_flight.answered(),
                    _ => in_flight.highest(),
                };
                Err(fenced(
                    self.forward_failure(e, route, Some(id)),
                    resource,
                    Some(token),
                    highest,
                ))
            }
        }
    }

    /// A malformed fenced request (400): not audited, but answered with the resource's highest.
    async fn refuse_malformed(&self, error: ProxyError, resource: ResourceKey) -> Rejected {
        let highest = self.gate.highest(&resource).await.ok().flatten();
        fenced(error, resource, None, highest)
    }

    /// A request on a collection: refused and audited under the resource it names.
    async fn refuse_collection<B>(
        &self,
        error: ProxyError,
        resource: ResourceKey,
        token_header: &HeaderName,
        request: &Request<B>,
        client: SocketAddr,
    ) -> Rejected {
        let token = token::from_header(request.headers(), token_header).ok();
        let highest = match self.gate.highest(&resource).await {
            Ok(highest) => highest,
            Err(e) => {
                tracing::error!(%resource, error = %e, "cannot read the highest token");
                return fenced(ProxyError::StoreUnavailable, resource, token, None);
            }
        };
        let fencing = FencingContext {
            resource,
            token,
            highest,
        };
        self.audit(Reason::Collection, error, fencing, request, client)
            .await
    }

    /// A missing or malformed token: refused and audited.
    async fn refuse_unparsed<B>(
        &self,
        resource: ResourceKey,
        error: TokenError,
        request: &Request<B>,
        client: SocketAddr,
    ) -> Rejected {
        let (reason, error) = match error {
            TokenError::Missing => (Reason::Missing, ProxyError::MissingToken(error)),
            TokenError::Repeated | TokenError::NotCanonical => {
                (Reason::Invalid, ProxyError::InvalidToken(error))
            }
        };
        let highest = match self.gate.highest(&resource).await {
            Ok(highest) => highest,
            Err(e) => {
                tracing::error!(%resource, error = %e, "cannot read the highest token");
                return fenced(ProxyError::StoreUnavailable, resource, None, None);
            }
        };
        let fencing = FencingContext {
            resource,
            token: None,
            highest,
        };
        self.audit(reason, error, fencing, request, client).await
    }

    /// A token a gate refused: stale or a jump is audited under the resource whose gate refused
    /// it; a store failure fails closed.
    async fn refuse<B>(
        &self,
        refused: RefusedBy,
        token: FencingToken,
        request: &Request<B>,
        client: SocketAddr,
    ) -> Rejected {
        let RefusedBy { resource, refusal } = refused;
        let (reason, error, highest) = match refusal {
            Refusal::Stale { highest } => {
                (Reason::Stale, ProxyError::Stale { token, highest }, highest)
            }
            Refusal::Jump { highest, limit } => {
                let error = ProxyError::Jump {
                    token,
                    highest,
                    limit,
                };
                (Reason::Jump, error, highest)
            }
            Refusal::NotDurable | Refusal::Store(_) => {
                tracing::error!(%resource, error = %refusal, "fenced request not admitted");
                let highest = self.gate.highest(&resource).await.ok().flatten();
                return fenced(ProxyError::StoreUnavailable, resource, Some(token), highest);
            }
        };
        let fencing = FencingContext {
            resource,
            token: Some(token),
            highest: Some(highest),
        };
        self.audit(reason, error, fencing, request, client).await
    }

    /// Commits the rejection to the audit log, then returns the answer. If the log cannot be
    /// written the answer is 503: the request is refused either way, but never unrecorded.
    async fn audit<B>(
        &self,
        reason: Reason,
        error: ProxyError,
        fencing: FencingContext,
        request: &Request<B>,
        client: SocketAddr,
    ) -> Rejected {
        let request_id = Some(id_text(request.headers().get(X_REQUEST_ID)))
            .filter(|id| !id.is_empty())
            .map(|id| audit::truncated(id, audit::MAX_AUDITED_REQUEST_ID));
        let (token, highest) = (fencing.token, fencing.highest);
        let identity = identity_of(request)
            .map(|identity| audit::truncated(&identity.to_string(), audit::MAX_AUDITED_IDENTITY));
        tracing::info!(
            resource = %fencing.resource, %reason, token = token.map(FencingToken::get),
            highest = highest.map(FencingToken::get),
            request_id = request_id.as_deref().unwrap_or(""),
            identity = identity.as_deref().unwrap_or(""), "fenced request rejected"
        );
        self.metrics.rejected(reason);
        let rejection = Rejection {
            at: SystemTime::now(),
            resource: fencing.resource.clone(),
            reason,
            token,
            highest,
            method: audit::truncated(request.method().as_str(), audit::MAX_AUDITED_METHOD),
            path: audit::truncated(request.uri().path(), audit::MAX_AUDITED_PATH),
            client: client.to_string(),
            request_id,
            identity,
        };
        let error = match self.store.record_rejection(rejection).await {
            Ok(()) => error,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a rejection in the audit log");
                ProxyError::StoreUnavailable
            }
        };
        Rejected {
            error,
            fencing: Some(fencing),
        }
    }

    /// Refuses a body whose declared length is over `max_body` before anything is forwarded.
    /// Bodies without a length are cut off while streaming instead.
    fn check_declared_length(&self, request: &Request<ClientBody>) -> Result<(), ProxyError> {
        match declared_length(request) {
            Some(length) if length > self.upstream.max_body() => Err(ProxyError::BodyTooLarge {
                limit: self.upstream.max_body(),
            }),
            _ => Ok(()),
        }
    }

    /// The answer to a failed upstream call; an upstream failure (502 or 504) is logged with the
    /// upstream, its cause and the request id, and counted by route and cause.
    fn forward_failure(
        &self,
        error: ForwardError,
        route: &Route,
        request_id: Option<&HeaderValue>,
    ) -> ProxyError {
        let answer = match error {
            // Before the other causes: a TLS alert arrives as a failed read or write.
            _ if let Some(failure) = error.tls_failure() => ProxyError::UpstreamTls(failure),
            ForwardError::Timeout => ProxyError::UpstreamTimeout(self.upstream.timeout()),
            ForwardError::BodyTooLarge => {
                return ProxyError::BodyTooLarge {
                    limit: self.upstream.max_body(),
                };
            }
            ForwardError::SwitchedProtocols => ProxyError::UpstreamSwitchedProtocols,
            ForwardError::Connect(_)
            | ForwardError::Handshake(_)
            | ForwardError::NotSent(_)
            | ForwardError::Exchange(_) => ProxyError::UpstreamUnreachable,
        };
        let status = answer.status().as_u16();
        let cause = error.cause();
        let request_id = request_id.and_then(|id| id.to_str().ok()).unwrap_or("");
        tracing::warn!(
            upstream = %route.upstream(),
            route = route.path(),
            cause,
            status,
            request_id,
            error = %error,
            "upstream failed"
        );
        self.metrics.upstream_failed(route.path(), status, cause);
        answer
    }
}

/// The identity of the client that sent `request`: its verified certificate's names, put in the
/// request's extensions by the TLS listener (or, in cluster mode, by the peer plane).
fn identity_of<B>(request: &Request<B>) -> Option<&ClientIdentity> {
    request
        .extensions()
        .get::<Arc<ClientIdentity>>()
        .map(Arc::as_ref)
}

/// Whether `route` lets the sender of `request` send fenced requests: anyone, unless it has allow
/// lists; then only a client whose certificate identity or bearer token they name.
fn allows<B>(route: &Route, request: &Request<B>) -> bool {
    route
        .allow()
        .is_none_or(|allow| allow.permits(identity_of(request), request.headers()))
}

/// What the access log needs from a request before it is handed to the proxy.
struct AccessStart {
    started: std::time::Instant,
    method: http::Method,
    target: String,
    request_id: Option<HeaderValue>,
    identity: Option<Arc<ClientIdentity>>,
}

impl AccessStart {
    fn of(request: &Request<ClientBody>) -> AccessStart {
        AccessStart {
            started: std::time::Instant::now(),
            method: request.method().clone(),
            target: request
                .uri()
                .path_and_query()
                .map_or_else(|| request.uri().to_string(), ToString::to_string),
            request_id: request.headers().get(X_REQUEST_ID).cloned(),
            identity: request.extensions().get::<Arc<ClientIdentity>>().cloned(),
        }
    }

    /// One line: client, method, target, resource and token (for a fenced request), status, the
    /// upstream's status (if the answer is the upstream's), body bytes (if known from the head),
    /// duration to the response head, request id, and the client's certificate identity if any.
    /// Text or JSON, as the other log lines.
    fn log(
        self,
        response: &Response<ProxyBody>,
        fencing: Option<(ResourceKey, Option<FencingToken>)>,
        client: SocketAddr,
    ) {
        let fencing = fencing.or_else(|| {
            response
                .extensions()
                .get::<Fenced>()
                .map(|fenced| (fenced.resource.clone(), Some(fenced.token)))
        });
        let upstream_status = match response.body() {
            Either::Left(_) => Some(response.status().as_u16()),
            Either::Right(_) => None,
        };
        let bytes = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
            .or_else(|| hyper::body::Body::size_hint(response.body()).exact());
        tracing::info!(
            target: "fencegate::access",
            %client,
            method = %self.method,
            path = %self.target,
            resource = fencing.as_ref().map(|(resource, _)| resource.as_str()),
            token = fencing.as_ref().and_then(|(_, token)| *token).map(FencingToken::get),
            status = response.status().as_u16(),
            upstream_status,
            bytes,
            duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            request_id = self.request_id.as_ref().and_then(|id| id.to_str().ok()),
            identity = self.identity.as_ref().map(tracing::field::display),
            "access"
        );
    }
}

/// The strictest `max_token_jump` of the routes a request changes.
fn max_jump(route: &Route, destination: Option<&Destination<'_>>) -> Option<u64> {
    let destination = destination.and_then(|d| d.resolved.route.max_token_jump());
    match (route.max_token_jump(), destination) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The authority the client addressed: HTTP/2's `:authority`, else the `Host` header.
fn request_authority<B>(request: &Request<B>) -> Option<&str> {
    request.uri().authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers()
            .get(http::header::HOST)
            .and_then(|host| host.to_str().ok())
    })
}

/// The request's declared length: its `Content-Length`, which the server that read the head
/// has made the body's exact size (hyper's does the same). Asked of the body, not looked up in
/// the headers: one lookup fewer on every request.
fn declared_length(request: &Request<ClientBody>) -> Option<u64> {
    hyper::body::Body::size_hint(request.body()).exact()
}

/// What a profile or a resource template reads of a request's head.
fn head_of<'a, B>(request: &'a Request<B>, path: &'a str) -> RequestHead<'a> {
    RequestHead {
        method: request.method(),
        path,
        query: request.uri().query(),
        headers: request.headers(),
    }
}

/// Whether the request declares a body: a non-zero `Content-Length`, or any `Transfer-Encoding`.
/// The server that read the head framed the body by them, so the body knows.
fn has_body(request: &Request<ClientBody>) -> bool {
    !hyper::body::Body::is_end_stream(request.body())
}

/// The id as the gate and the audit log take it: empty if there is none (or it is not visible
/// ASCII).
fn id_text(id: Option<&HeaderValue>) -> &str {
    id.and_then(|value| value.to_str().ok()).unwrap_or("")
}

fn fenced(
    error: ProxyError,
    resource: ResourceKey,
    token: Option<FencingToken>,
    highest: Option<FencingToken>,
) -> Rejected {
    Rejected {
        error,
        fencing: Some(FencingContext {
            resource,
            token,
            highest,
        }),
    }
}
