//! The processor's gRPC handlers for configured controllers: Deliver, Cancel, GetStatus and
//! ListSubprocessors.

use std::collections::HashMap;
use std::sync::Arc;

use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::{
    CancelDeliveryRequest, DeliverRequest, DeliverResponse, GetStatusRequest,
    ListSubprocessorsRequest, RequestKind, Subprocessor, SubprocessorList, TaskList,
};
use dsrelay_runtime::identity::validate_identities;
use dsrelay_runtime::trace_context;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::app::Shared;
use crate::store::Accepted;

/// The ProcessorService implementation.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
    controllers: Arc<HashMap<String, String>>,
}

impl Api {
    /// Handlers over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        let controllers = shared
            .config
            .controllers
            .iter()
            .map(|c| (c.identity.clone(), c.name.clone()))
            .collect();
        Self {
            shared,
            controllers: Arc::new(controllers),
        }
    }

    /// The controller calling, or PERMISSION_DENIED.
    fn controller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let identity = dsrelay_runtime::tls::peer_identity(req).ok_or_else(|| {
            Status::permission_denied("no client certificate with a URI or DNS SAN was presented")
        })?;
        self.controllers.get(&identity).cloned().ok_or_else(|| {
            Status::permission_denied(format!(
                "certificate identity {identity} is not a controller of this processor"
            ))
        })
    }
}

impl Api {
    async fn deliver_traced(
        &self,
        req: Request<DeliverRequest>,
        span: tracing::Span,
    ) -> Result<Response<DeliverResponse>, Status> {
        let controller = self.controller(&req)?;
        span.record("controller", controller.as_str());
        // Without a tracer, the registry's header still names the request's trace.
        let traceparent = trace_context::traceparent_of(&span).or_else(|| {
            req.metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .filter(|tp| trace_context::trace_id_from_traceparent(tp).is_some())
                .map(str::to_string)
        });

        let r = req.into_inner();
        check_id(&r.request_id)?;
        if RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified)
            == RequestKind::Unspecified
        {
            return Err(invalid("kind", format!("{} is not a request kind", r.kind)));
        }
        if let Some(v) = validate_identities(&r.identities).into_iter().next() {
            return Err(invalid(&v.field, &v.rule));
        }
        let wanted: Vec<&str> = r
            .scope
            .as_ref()
            .map(|s| s.data_categories.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let subprocessors: Vec<String> = self
            .shared
            .config
            .subprocessors
            .iter()
            .filter(|s| {
                wanted.is_empty() || s.categories.iter().any(|c| wanted.contains(&c.as_str()))
            })
            .map(|s| s.name.clone())
            .collect();
        let accepted = self
            .shared
            .store
            .accept(
                &controller,
                &r,
                &subprocessors,
                traceparent.as_deref(),
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(internal)?;
        let (tasks, duplicate) = match accepted {
            Accepted::New(t) => {
                tracing::info!(tasks = t.len(), "request accepted");
                self.shared.task_wakeup.notify_one();
                (t, false)
            }
            Accepted::Duplicate(t) => (t, true),
        };
        Ok(Response::new(DeliverResponse {
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
            duplicate,
        }))
    }
}

fn invalid(field: &str, rule: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {rule}"))
}

fn check_id(id: &str) -> Result<(), Status> {
    match dsrelay_runtime::identity::request_id_violation("request_id", id) {
        Some(v) => Err(invalid(&v.field, &v.rule)),
        None => Ok(()),
    }
}

fn internal(e: anyhow::Error) -> Status {
    tracing::error!(error = format!("{e:#}"), "internal error");
    Status::internal("internal error; the processor logged the details")
}

#[tonic::async_trait]
impl ProcessorService for Api {
    async fn deliver(
        &self,
        req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        // A child of the registry's delivery attempt: the trace crosses the hop.
        let trace_id = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_context::trace_id_from_traceparent)
            .unwrap_or_default();
        let span = tracing::info_span!(
            "accept",
            request_id = %req.get_ref().request_id,
            trace_id = %trace_id,
            controller = tracing::field::Empty,
        );
        trace_context::set_parent(&span, trace_context::extract(req.metadata()));
        self.deliver_traced(req, span.clone())
            .instrument(span)
            .await
    }

    #[tracing::instrument(skip_all, fields(controller, request_id = %req.get_ref().request_id))]
    async fn cancel(
        &self,
        req: Request<CancelDeliveryRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        let r = req.into_inner();
        check_id(&r.request_id)?;
        if let Some(v) = dsrelay_runtime::identity::text_violation("reason", &r.reason, 1024, false)
        {
            return Err(invalid(&v.field, &v.rule));
        }
        let tasks = self
            .shared
            .store
            .cancel(
                &controller,
                &r.request_id,
                &r.reason,
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(internal)?;
        self.shared.ack_wakeup.notify_one();
        tracing::info!("request cancelled");
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }

    async fn list_subprocessors(
        &self,
        req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        self.controller(&req)?;
        let kinds: Vec<RequestKind> = (1..=6)
            .filter_map(|k| RequestKind::try_from(k).ok())
            .collect();
        let subprocessors = self
            .shared
            .config
            .subprocessors
            .iter()
            .map(|s| {
                let connector = self.shared.connectors.get(&s.name);
                Subprocessor {
                    name: s.name.clone(),
                    country: s.country.clone(),
                    transfer_mechanism: s.transfer_mechanism.to_proto() as i32,
                    data_categories: s.categories.clone(),
                    connector: connector.map(|c| c.kind_name()).unwrap_or("").to_string(),
                    supported_kinds: kinds
                        .iter()
                        .filter(|k| connector.is_some_and(|c| c.supports(**k)))
                        .map(|k| *k as i32)
                        .collect(),
                    description: s.description.clone(),
                }
            })
            .collect();
        Ok(Response::new(SubprocessorList { subprocessors }))
    }

    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        let r = req.into_inner();
        check_id(&r.request_id)?;
        let store = &self.shared.store;
        if !store
            .request_exists(&controller, &r.request_id)
            .await
            .map_err(internal)?
        {
            return Err(Status::not_found(format!(
                "request {} was not delivered here",
                r.request_id
            )));
        }
        let tasks = store
            .tasks(&controller, &r.request_id)
            .await
            .map_err(internal)?;
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }
}
