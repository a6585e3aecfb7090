//! The protobuf codec of every generated client and server: tonic-prost's, except that a
//! message that is not valid protobuf is answered INVALID_ARGUMENT, not INTERNAL.
//!
//! tonic-prost follows the gRPC status-code table, which files a request that cannot be
//! parsed under INTERNAL. To a caller that reads as "the service broke", and to an operator's
//! alert on INTERNAL it looks like a bug in the service, when the caller sent bytes that are
//! not the message the method takes. INVALID_ARGUMENT, with a message naming the message type,
//! tells the caller what to fix. The same codec decodes answers in clients, where a
//! malformed answer also comes back INVALID_ARGUMENT, naming the answer's type.
//!
//! Tested end to end: `bad_input.rs` sends undecodable Submits, and the hostile-input table
//! (`hostile.rs`) an undecodable body to every RPC.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// [`ProstCodec`] with decode failures answered INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct DsrelayCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for DsrelayCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for DsrelayCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = DsrelayDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        DsrelayDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, answering bytes that are not a `U` with INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct DsrelayDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for DsrelayDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = short_type_name::<U>();
            // A field violation like every other INVALID_ARGUMENT of the services', on the
            // body as a whole, since no field of it could be read.
            Status::with_error_details(
                Code::InvalidArgument,
                format!(
                    "the message is not a valid protobuf {name}: {e}; send the message this \
                     method takes, encoded as protobuf"
                ),
                ErrorDetails::with_bad_request_violation(
                    "(message)",
                    format!("not a valid protobuf {name}"),
                ),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `dsrelay_proto::v1::SubmitRequest` → `SubmitRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}
