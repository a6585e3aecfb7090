//! Assembling a [`SubmitRequest`].
//!
//! The builder only assembles; the registry validates (identity formats, limits, which
//! parameters a kind needs) and answers `INVALID_ARGUMENT` naming the field, so the rules live
//! in one place.

use dsrelay_proto::v1::{
    FieldCorrection, IdentityEncoding, IdentityType, RequestKind, RequestParameters, Scope,
    SubjectIdentity, SubmitRequest,
};

/// A raw identity of type `ty`, e.g. `identity(IdentityType::Email, "maija@example.fi")`.
pub fn identity(ty: IdentityType, value: impl Into<String>) -> SubjectIdentity {
    SubjectIdentity {
        r#type: ty.into(),
        encoding: IdentityEncoding::Raw.into(),
        value: value.into(),
        label: String::new(),
    }
}

/// An identity given as a lowercase hex digest of the normalised value (see
/// `dsrelay_runtime::identity::normalize`), for partners that never see the raw value.
pub fn hashed_identity(
    ty: IdentityType,
    encoding: IdentityEncoding,
    hex: impl Into<String>,
) -> SubjectIdentity {
    SubjectIdentity {
        r#type: ty.into(),
        encoding: encoding.into(),
        value: hex.into(),
        label: String::new(),
    }
}

/// A raw identity of type OTHER; `label` says what it is (e.g. `loyalty-card`).
pub fn other_identity(label: impl Into<String>, value: impl Into<String>) -> SubjectIdentity {
    SubjectIdentity {
        label: label.into(),
        ..identity(IdentityType::Other, value)
    }
}

/// Builds a [`SubmitRequest`] step by step.
///
/// ```
/// use dsrelay_sdk::SubmitBuilder;
/// let request = SubmitBuilder::erasure()
///     .email("maija@example.fi")
///     .customer_number("C-1")
///     .categories(["contact"])
///     .idempotency_key("ticket-4711")
///     .build();
/// assert_eq!(request.identities.len(), 2);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct SubmitBuilder {
    request: SubmitRequest,
}

impl SubmitBuilder {
    /// A request of `kind` with no identities yet.
    pub fn new(kind: RequestKind) -> Self {
        Self {
            request: SubmitRequest {
                kind: kind.into(),
                ..SubmitRequest::default()
            },
        }
    }

    /// An ERASURE request (GDPR art. 17).
    pub fn erasure() -> Self {
        Self::new(RequestKind::Erasure)
    }

    /// A RETURN_OF_DATA request (art. 15, 20).
    pub fn return_of_data() -> Self {
        Self::new(RequestKind::ReturnOfData)
    }

    /// A TRANSFER request to `recipient`, the name of a recipient configured at the registry
    /// (art. 20(2)).
    pub fn transfer(recipient: impl Into<String>) -> Self {
        Self::new(RequestKind::Transfer).transfer_recipient(recipient)
    }

    /// A RECTIFICATION request; add the corrected values with [`Self::correct`].
    pub fn rectification() -> Self {
        Self::new(RequestKind::Rectification)
    }

    /// A RESTRICTION request; it sets a restriction unless [`Self::lift_restriction`] is set.
    pub fn restriction() -> Self {
        Self::new(RequestKind::Restriction)
    }

    /// An OBJECTION to direct marketing (art. 21(2)).
    pub fn objection() -> Self {
        Self::new(RequestKind::Objection)
    }

    /// Adds any identity.
    pub fn identity(mut self, identity: SubjectIdentity) -> Self {
        self.request.identities.push(identity);
        self
    }

    /// Adds a raw e-mail address.
    pub fn email(self, value: impl Into<String>) -> Self {
        self.identity(identity(IdentityType::Email, value))
    }

    /// Adds a raw phone number, preferably E.164.
    pub fn phone(self, value: impl Into<String>) -> Self {
        self.identity(identity(IdentityType::Phone, value))
    }

    /// Adds the controller's customer number.
    pub fn customer_number(self, value: impl Into<String>) -> Self {
        self.identity(identity(IdentityType::CustomerNumber, value))
    }

    /// Adds a national identification number.
    pub fn national_id(self, value: impl Into<String>) -> Self {
        self.identity(identity(IdentityType::NationalId, value))
    }

    /// Adds an identity of type OTHER named by `label`.
    pub fn other(self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.identity(other_identity(label, value))
    }

    /// Adds an e-mail address given as the hex SHA-256 of its trimmed, lowercased form.
    pub fn sha256_email(self, hex: impl Into<String>) -> Self {
        self.identity(hashed_identity(
            IdentityType::Email,
            IdentityEncoding::Sha256,
            hex,
        ))
    }

    /// Adds an e-mail address given as the hex MD5 of its trimmed, lowercased form.
    pub fn md5_email(self, hex: impl Into<String>) -> Self {
        self.identity(hashed_identity(
            IdentityType::Email,
            IdentityEncoding::Md5,
            hex,
        ))
    }

    /// Limits the request to one more data category (none means all data).
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.scope_mut().data_categories.push(category.into());
        self
    }

    /// Limits the request to these data categories as well.
    pub fn categories<I, S>(mut self, categories: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scope_mut()
            .data_categories
            .extend(categories.into_iter().map(Into::into));
        self
    }

    /// Sets the idempotency key; without one (an empty key counts as none), [`Self::build`]
    /// picks a fresh UUID, which only the built request holds.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.request.idempotency_key = key.into();
        self
    }

    /// Sets the free-text note (e.g. the partner's ticket number; no identities in it).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.request.note = note.into();
        self
    }

    /// Adds a corrected value, for RECTIFICATION.
    pub fn correct(mut self, field: impl Into<String>, new_value: impl Into<String>) -> Self {
        self.parameters_mut().corrections.push(FieldCorrection {
            field: field.into(),
            new_value: new_value.into(),
        });
        self
    }

    /// Lifts a restriction set earlier instead of setting one, for RESTRICTION.
    pub fn lift_restriction(mut self, lift: bool) -> Self {
        self.parameters_mut().lift_restriction = lift;
        self
    }

    /// Sets the transfer recipient, for TRANSFER.
    pub fn transfer_recipient(mut self, recipient: impl Into<String>) -> Self {
        self.parameters_mut().transfer_recipient = recipient.into();
        self
    }

    fn scope_mut(&mut self) -> &mut Scope {
        self.request.scope.get_or_insert_with(Scope::default)
    }

    fn parameters_mut(&mut self) -> &mut RequestParameters {
        self.request
            .parameters
            .get_or_insert_with(RequestParameters::default)
    }

    /// The request. When no idempotency key was set a fresh UUID v4 is used: keep the built
    /// request (not the builder) to retry it, or the retry becomes a second request.
    pub fn build(mut self) -> SubmitRequest {
        if self.request.idempotency_key.is_empty() {
            self.request.idempotency_key = uuid::Uuid::new_v4().to_string();
        }
        self.request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_identities_scope_and_key() {
        let r = SubmitBuilder::erasure()
            .email("x@y.fi")
            .customer_number("C-1")
            .other("loyalty-card", "L-9")
            .sha256_email("ab".repeat(32))
            .categories(["contact", "marketing"])
            .category("invoicing")
            .idempotency_key("k-1")
            .note("ticket 7")
            .build();
        assert_eq!(r.kind, RequestKind::Erasure as i32);
        assert_eq!(r.identities.len(), 4);
        assert_eq!(r.identities[0], identity(IdentityType::Email, "x@y.fi"));
        assert_eq!(r.identities[1].r#type, IdentityType::CustomerNumber as i32);
        assert_eq!(r.identities[2].label, "loyalty-card");
        assert_eq!(r.identities[2].r#type, IdentityType::Other as i32);
        assert_eq!(r.identities[3].encoding, IdentityEncoding::Sha256 as i32);
        assert_eq!(
            r.scope.unwrap().data_categories,
            ["contact", "marketing", "invoicing"]
        );
        assert_eq!(r.idempotency_key, "k-1");
        assert_eq!(r.note, "ticket 7");
        assert!(
            r.parameters.is_none(),
            "no parameters unless the kind needs them"
        );
    }

    #[test]
    fn kind_parameters() {
        let r = SubmitBuilder::rectification()
            .email("x@y.fi")
            .correct("phone", "+358401234567")
            .build();
        let p = r.parameters.unwrap();
        assert_eq!(p.corrections[0].field, "phone");
        assert_eq!(p.corrections[0].new_value, "+358401234567");

        let r = SubmitBuilder::transfer("spiffe://x/recipient/a").build();
        assert_eq!(r.kind, RequestKind::Transfer as i32);
        assert_eq!(
            r.parameters.unwrap().transfer_recipient,
            "spiffe://x/recipient/a"
        );

        let r = SubmitBuilder::restriction().lift_restriction(true).build();
        assert!(r.parameters.unwrap().lift_restriction);
    }

    #[test]
    fn missing_key_gets_a_fresh_uuid() {
        let a = SubmitBuilder::objection().email("x@y.fi").build();
        let b = SubmitBuilder::objection().email("x@y.fi").build();
        assert!(uuid::Uuid::parse_str(&a.idempotency_key).is_ok());
        assert_ne!(a.idempotency_key, b.idempotency_key);
    }
}
