//! OpenAPI schemas (utoipa) for model types whose JSON a derive cannot describe. Compiled with
//! the `openapi` feature, which the relay enables to serve its OpenAPI document; the other model
//! types derive `utoipa::ToSchema` under the same feature.

use std::borrow::Cow;

use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use crate::model::Secret;

/// A secret is a string in requests and `{"set": <bool>}` in answers (the API never returns a
/// secret); a `PUT` may send the answer's form back to keep (`true`) or clear (`false`) it.
///
/// `ComposeSchema` is the trait utoipa's derives implement (`PartialSchema` follows from it); it is
/// what lets `Secret` appear inside containers such as the `BTreeMap` of query parameters.
impl utoipa::__dev::ComposeSchema for Secret {
    fn compose(_generics: Vec<RefOr<Schema>>) -> RefOr<Schema> {
        let value = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "The secret's value. Accepted in requests, never returned: it is stored \
                 encrypted and answers show {\"set\": true} instead.",
            ))
            .write_only(Some(true));
        let marker = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("set", ObjectBuilder::new().schema_type(Type::Boolean))
            .required("set")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .description(Some(
                "How answers show a secret: whether it is set (non-empty). In a PUT that keeps \
                 the auth type, {\"set\": true} keeps the stored value and {\"set\": false} \
                 clears it.",
            ));
        Schema::OneOf(
            OneOfBuilder::new()
                .item(value)
                .item(marker)
                .description(Some(
                    "A write-only secret: a string in requests, {\"set\": bool} in answers.",
                ))
                .build(),
        )
        .into()
    }
}

impl utoipa::ToSchema for Secret {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Secret")
    }
}
