//! The SubprocessorAdapter handlers: who may call, what a valid request is, and the
//! adapter's error type (made into statuses by the rules of [`dsrelay_runtime::grpc::error`]).

use std::sync::Arc;

use dsrelay_proto::v1::subprocessor_adapter_server::SubprocessorAdapter;
use dsrelay_proto::v1::{
    BulkOperation, DescribeRequest, DescribeResponse, ExecuteBulkRequest, ExecuteBulkResponse,
    ExecuteRequest, ExecuteResponse, ExportPage, GetBulkStatusRequest, GetExportPageRequest,
    GetTaskStatusRequest, IdentityEncoding, IdentityType, RequestKind, SubjectIdentity,
};
use dsrelay_runtime::grpc::{self, Authorizer, ServiceName};
use dsrelay_runtime::identity::{text_violation, validate_identities, FieldViolation};
use tonic::{Request, Response, Status};

use crate::export::{DEFAULT_PAGE_BYTES, MAX_PAGE_BYTES, MIN_PAGE_BYTES};
use crate::newsletter::{DATA_CATEGORIES, NAME, SUPPORTED_KINDS};
use crate::store::{Store, StoreError};

/// At most this many bytes in a task id.
pub(crate) const MAX_TASK_ID: usize = 256;
/// At most this many bytes in a request id.
pub(crate) const MAX_REQUEST_ID: usize = 128;
/// At most this many scope categories, of at most [`MAX_CATEGORY`] bytes.
pub(crate) const MAX_CATEGORIES: usize = 32;
/// See [`MAX_CATEGORIES`].
pub(crate) const MAX_CATEGORY: usize = 64;
/// At most this many corrections per RECTIFICATION.
pub(crate) const MAX_CORRECTIONS: usize = 32;
/// At most this many bytes in the name of a corrected field.
pub(crate) const MAX_FIELD: usize = 64;
/// At most this many bytes in a corrected value.
pub(crate) const MAX_NEW_VALUE: usize = 1024;
/// At most this many bytes in a transfer recipient.
pub(crate) const MAX_RECIPIENT: usize = 256;
/// At most this many bytes in a controller name.
pub(crate) const MAX_CONTROLLER: usize = 256;

/// Names the adapter in its answers.
#[derive(Debug)]
pub enum Adapter {}

impl ServiceName for Adapter {
    const NAME: &'static str = "adapter";
}

/// What can go wrong in an adapter call.
pub(crate) type ApiError = grpc::ApiError<Adapter>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Self::already_exists(m),
            StoreError::NotFound(m) => Self::not_found(m),
            StoreError::FailedPrecondition(m) => Self::failed_precondition(m),
            StoreError::InvalidToken(rule) => {
                Self::invalid([FieldViolation::new("page_token", rule)])
            }
            StoreError::Unexpected(err) => Self::unexpected(err),
        }
    }
}

/// The SubprocessorAdapter implementation.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    store: Store,
    /// The callers allowed, by certificate identity, which also names them (one role).
    allowed: Arc<Authorizer<()>>,
    confirm_delay_ms: u64,
    /// The controller of requests that name none (older processors).
    default_controller: String,
}

impl Api {
    /// Handlers over `store` for the callers in `allowed`.
    pub(crate) fn new(
        store: Store,
        allowed: &[String],
        confirm_delay_ms: u64,
        default_controller: &str,
    ) -> Self {
        let allowed = Authorizer::new(
            allowed.iter().map(|id| (id.clone(), (), id.clone())),
            "may not call this adapter",
        );
        Self {
            store,
            allowed: Arc::new(allowed),
            confirm_delay_ms,
            default_controller: default_controller.to_string(),
        }
    }

    /// The caller's certificate identity, or PERMISSION_DENIED.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        Ok(self.allowed.caller(req)?.name)
    }
}

fn check_id(out: &mut Vec<FieldViolation>, field: &str, value: &str, max: usize) {
    if value.is_empty() || value.len() > max {
        out.push(FieldViolation::new(
            field,
            format!("must be 1 to {max} bytes"),
        ));
    } else if value.chars().any(char::is_control) {
        out.push(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
}

/// The rule a raw value of type `ty` breaks, if any (the identity rules, reused).
fn raw_value_rule(ty: IdentityType, value: &str) -> Option<String> {
    let probe = SubjectIdentity {
        r#type: ty as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: value.to_string(),
        label: String::new(),
    };
    validate_identities(&[probe])
        .into_iter()
        .next()
        .map(|v| v.rule)
}

/// Every rule `r` breaks, each naming its field (the page token is checked against its task
/// by the store).
pub(crate) fn validate_export_page(r: &GetExportPageRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    check_id(&mut out, "task_id", &r.task_id, MAX_TASK_ID);
    if r.max_bytes != 0 && !(MIN_PAGE_BYTES..=MAX_PAGE_BYTES).contains(&r.max_bytes) {
        out.push(FieldViolation::new(
            "max_bytes",
            format!("must be 0 (the default) or {MIN_PAGE_BYTES} to {MAX_PAGE_BYTES}"),
        ));
    }
    out
}

/// Every rule `r` breaks, each naming its field.
pub(crate) fn validate_bulk(r: &ExecuteBulkRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    check_id(&mut out, "job_id", &r.job_id, MAX_TASK_ID);
    check_id(&mut out, "request_id", &r.request_id, MAX_REQUEST_ID);
    check_id(&mut out, "controller", &r.controller, MAX_CONTROLLER);
    let operation = BulkOperation::try_from(r.operation).unwrap_or(BulkOperation::Unspecified);
    if operation == BulkOperation::Unspecified {
        out.push(FieldViolation::new(
            "operation",
            format!("must be EXPORT or ERASE (got {})", r.operation),
        ));
    }
    if r.retention_expired && operation == BulkOperation::Export {
        out.push(FieldViolation::new(
            "retention_expired",
            "applies only to ERASE: an export retains nothing",
        ));
    }
    out
}

/// Every rule `r` breaks, each naming its field.
pub(crate) fn validate_execute(r: &ExecuteRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    check_id(&mut out, "task_id", &r.task_id, MAX_TASK_ID);
    check_id(&mut out, "request_id", &r.request_id, MAX_REQUEST_ID);
    // Empty is allowed: older processors send none, and the default controller is meant.
    if r.controller.len() > MAX_CONTROLLER || r.controller.chars().any(char::is_control) {
        out.push(FieldViolation::new(
            "controller",
            format!("must be at most {MAX_CONTROLLER} bytes without control characters"),
        ));
    }
    let kind = RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified);
    if kind == RequestKind::Unspecified {
        out.push(FieldViolation::new(
            "kind",
            format!(
                "must be one of ERASURE, RETURN_OF_DATA, TRANSFER, RECTIFICATION, RESTRICTION, \
                 OBJECTION (got {})",
                r.kind
            ),
        ));
    }
    out.extend(validate_identities(&r.identities));
    if let Some(scope) = &r.scope {
        if scope.data_categories.len() > MAX_CATEGORIES {
            out.push(FieldViolation::new(
                "scope.data_categories",
                format!("at most {MAX_CATEGORIES} categories are allowed"),
            ));
        }
        for (i, c) in scope.data_categories.iter().enumerate() {
            out.extend(text_violation(
                &format!("scope.data_categories[{i}]"),
                c,
                MAX_CATEGORY,
                true,
            ));
        }
    }
    let params = r.parameters.clone().unwrap_or_default();
    match kind {
        RequestKind::Rectification => {
            if params.corrections.is_empty() || params.corrections.len() > MAX_CORRECTIONS {
                out.push(FieldViolation::new(
                    "parameters.corrections",
                    format!("RECTIFICATION needs 1 to {MAX_CORRECTIONS} corrections"),
                ));
            }
            for (i, c) in params.corrections.iter().enumerate() {
                let f = |name: &str| format!("parameters.corrections[{i}].{name}");
                // Both are stored (a field not held here is named in the answer's note): a
                // control character would be kept, or fail the write on PostgreSQL (NUL)
                // after the request was accepted.
                out.extend(text_violation(&f("field"), &c.field, MAX_FIELD, true));
                if let Some(v) = text_violation(&f("new_value"), &c.new_value, MAX_NEW_VALUE, false)
                {
                    out.push(v);
                    continue;
                }
                let rule = match c.field.trim().to_ascii_lowercase().as_str() {
                    "email" => raw_value_rule(IdentityType::Email, c.new_value.trim()),
                    "phone" => raw_value_rule(IdentityType::Phone, c.new_value.trim()),
                    "name" if c.new_value.trim().is_empty() => Some("must not be empty".into()),
                    _ => None,
                };
                if let Some(rule) = rule {
                    out.push(FieldViolation::new(f("new_value"), rule));
                }
            }
        }
        RequestKind::Transfer => {
            let recipient = params.transfer_recipient.trim();
            if recipient.is_empty() || recipient.len() > MAX_RECIPIENT {
                out.push(FieldViolation::new(
                    "parameters.transfer_recipient",
                    format!("TRANSFER needs a recipient of 1 to {MAX_RECIPIENT} bytes"),
                ));
            } else {
                // Named in the stored note, like a correction.
                out.extend(text_violation(
                    "parameters.transfer_recipient",
                    recipient,
                    MAX_RECIPIENT,
                    true,
                ));
            }
        }
        _ => {}
    }
    out
}

#[tonic::async_trait]
impl SubprocessorAdapter for Api {
    async fn describe(
        &self,
        req: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(DescribeResponse {
            name: NAME.into(),
            supported_kinds: SUPPORTED_KINDS.iter().map(|k| *k as i32).collect(),
            data_categories: DATA_CATEGORIES.iter().map(|c| c.to_string()).collect(),
        }))
    }

    // The processor's connector span is the parent, so the adapter shows in the request's
    // trace.
    #[tracing::instrument(name = "adapter.execute", skip_all, fields(
        task_id = %req.get_ref().task_id,
        request_id = %req.get_ref().request_id,
    ))]
    async fn execute(
        &self,
        req: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        let caller = self.caller(&req)?;
        let mut r = req.into_inner();
        ApiError::ensure_valid(validate_execute(&r))?;
        if r.controller.is_empty() {
            r.controller = self.default_controller.clone();
        }
        let now = dsrelay_runtime::store::now_ms();
        let response = self
            .store
            .execute(&caller, &r, now, self.confirm_delay_ms)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(outcome = response.outcome, "task executed");
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(task_id = %req.get_ref().task_id))]
    async fn get_task_status(
        &self,
        req: Request<GetTaskStatusRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        check_id(&mut violations, "task_id", &r.task_id, MAX_TASK_ID);
        ApiError::ensure_valid(violations)?;
        let now = dsrelay_runtime::store::now_ms();
        let response = self
            .store
            .status(&caller, &r.task_id, now)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(name = "adapter.execute_bulk", skip_all, fields(
        job_id = %req.get_ref().job_id,
        request_id = %req.get_ref().request_id,
        controller = %req.get_ref().controller,
    ))]
    async fn execute_bulk(
        &self,
        req: Request<ExecuteBulkRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(validate_bulk(&r))?;
        let now = dsrelay_runtime::store::now_ms();
        let response = self
            .store
            .execute_bulk(&caller, &r, now)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(outcome = response.outcome, "bulk job executed");
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn get_bulk_status(
        &self,
        req: Request<GetBulkStatusRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        check_id(&mut violations, "job_id", &r.job_id, MAX_TASK_ID);
        ApiError::ensure_valid(violations)?;
        let response = self
            .store
            .bulk_status(&caller, &r.job_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(name = "adapter.export_page", skip_all, fields(
        task_id = %req.get_ref().task_id,
    ))]
    async fn get_export_page(
        &self,
        req: Request<GetExportPageRequest>,
    ) -> Result<Response<ExportPage>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(validate_export_page(&r))?;
        let max_bytes = match r.max_bytes {
            0 => DEFAULT_PAGE_BYTES,
            n => n,
        };
        let (records, next_page_token) = self
            .store
            .export_page(&caller, &r.task_id, &r.page_token, max_bytes as usize)
            .await
            .map_err(ApiError::from)?;
        tracing::debug!(
            records = records.len(),
            last = next_page_token.is_empty(),
            "export page served"
        );
        Ok(Response::new(ExportPage {
            records,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{FieldCorrection, RequestParameters, Scope};

    use super::*;

    fn email(v: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: v.into(),
            label: String::new(),
        }
    }

    fn fields(r: &ExecuteRequest) -> Vec<String> {
        validate_execute(r).into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_good_request_passes() {
        let r = ExecuteRequest {
            task_id: "c/r/s".into(),
            request_id: "r".into(),
            kind: RequestKind::Erasure as i32,
            identities: vec![email("a@b.fi")],
            ..Default::default()
        };
        assert!(validate_execute(&r).is_empty());
    }

    #[test]
    fn names_every_bad_field() {
        let r = ExecuteRequest {
            task_id: String::new(),
            request_id: "r\n".into(),
            kind: 0,
            identities: vec![email("nope")],
            scope: Some(Scope {
                data_categories: vec![String::new()],
            }),
            ..Default::default()
        };
        assert_eq!(
            fields(&r),
            vec![
                "task_id",
                "request_id",
                "kind",
                "identities[0].value",
                "scope.data_categories[0]"
            ]
        );
    }

    #[test]
    fn checks_kind_parameters() {
        let mut r = ExecuteRequest {
            task_id: "t".into(),
            request_id: "r".into(),
            kind: RequestKind::Rectification as i32,
            identities: vec![email("a@b.fi")],
            ..Default::default()
        };
        assert_eq!(fields(&r), vec!["parameters.corrections"]);
        r.parameters = Some(RequestParameters {
            corrections: vec![
                FieldCorrection {
                    field: "email".into(),
                    new_value: "not-an-address".into(),
                },
                FieldCorrection {
                    field: "phone".into(),
                    new_value: "12".into(),
                },
                FieldCorrection {
                    field: "address".into(),
                    new_value: "Anywhere 1".into(),
                },
            ],
            ..Default::default()
        });
        assert_eq!(
            fields(&r),
            vec![
                "parameters.corrections[0].new_value",
                "parameters.corrections[1].new_value"
            ]
        );
        r.kind = RequestKind::Transfer as i32;
        assert_eq!(fields(&r), vec!["parameters.transfer_recipient"]);
    }

    /// Every text that is stored or compared is checked for control characters, each named
    /// by its field: a NUL would be kept on SQLite and fail the write on PostgreSQL.
    #[test]
    fn control_characters_in_corrections_categories_and_recipients_are_refused() {
        let correction = |field: &str, new_value: &str| FieldCorrection {
            field: field.into(),
            new_value: new_value.into(),
        };
        let r = ExecuteRequest {
            task_id: "t".into(),
            request_id: "r".into(),
            kind: RequestKind::Rectification as i32,
            identities: vec![email("a@b.fi")],
            scope: Some(Scope {
                data_categories: vec!["contact".into(), "contact\u{0}".into(), "\u{1b}[2J".into()],
            }),
            parameters: Some(RequestParameters {
                corrections: vec![
                    correction("name", "Bob\u{0}"),
                    correction("name", "Bob\u{7}Smith"),
                    correction("address\u{0}", "Anywhere 1"),
                    // Tab and line breaks are text; trimmed away for a name.
                    correction("name", "Bob Smith\n"),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let violations = validate_execute(&r);
        let named: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            named,
            vec![
                "scope.data_categories[1]",
                "scope.data_categories[2]",
                "parameters.corrections[0].new_value",
                "parameters.corrections[1].new_value",
                "parameters.corrections[2].field",
            ]
        );
        assert!(
            violations
                .iter()
                .all(|v| v.rule.contains("control characters")),
            "{violations:?}"
        );
        let status = Status::from(ApiError::ensure_valid(violations).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("parameters.corrections[0].new_value"),
            "{status:?}"
        );

        let r = ExecuteRequest {
            kind: RequestKind::Transfer as i32,
            scope: None,
            parameters: Some(RequestParameters {
                transfer_recipient: "other\u{0}".into(),
                ..Default::default()
            }),
            ..r
        };
        assert_eq!(fields(&r), vec!["parameters.transfer_recipient"]);
    }
}
