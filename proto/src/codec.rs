//! The protobuf codec of every generated client and server: tonic-prost's, except that a
//! message that is not valid protobuf is answered INVALID_ARGUMENT, not INTERNAL.
//!
//! tonic-prost follows the gRPC status-code table, which files a request that cannot be
//! parsed under INTERNAL. To a caller that reads as "the service broke", and to an operator's
//! alert on INTERNAL it looks like a bug in the service, when the caller sent bytes that are
//! not the message the method takes. INVALID_ARGUMENT, with a message naming the message type,
//! tells the caller what to fix. The same codec decodes answers in clients, where a
//! malformed answer also comes back INVALID_ARGUMENT with that text, which no server sent:
//! the decoder cannot tell which side it decodes for. It therefore marks every decode failure
//! with an [`Undecodable`] source, which a status received from the other party never has
//! (sources do not cross the wire): a client finds it with [`undecodable`] and words the
//! failure as an answer it could not read, neither as the server's INVALID_ARGUMENT nor with
//! the advice meant for a caller.
//!
//! Tested end to end: `bad_input.rs` sends undecodable Submits, and the hostile-input table
//! (`hostile.rs`) an undecodable body to every RPC.

use std::marker::PhantomData;
use std::sync::Arc;

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
            let mut status = Status::with_error_details(
                Code::InvalidArgument,
                format!(
                    "the message is not a valid protobuf {name}: {e}; send the message this \
                     method takes, encoded as protobuf"
                ),
                ErrorDetails::with_bad_request_violation(
                    "(message)",
                    format!("not a valid protobuf {name}"),
                ),
            );
            status.set_source(Arc::new(Undecodable {
                type_name: name,
                error: e.to_string(),
            }));
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// What a [`DsrelayDecoder`] could not decode: the source of the status it fails with, on
/// whichever side it decodes (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// The message type expected, without its module path (`ExecuteResponse`).
    pub type_name: &'static str,
    /// Why the bytes are not that message, as protobuf decoding found it.
    pub error: String,
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a valid protobuf {}: {}", self.type_name, self.error)
    }
}

impl std::error::Error for Undecodable {}

/// The decode failure behind `status`, when this side's [`DsrelayDecoder`] raised it: in a
/// client, the answer that arrived could not be read (the server answered OK with bytes that
/// are not the method's answer). `None` for a status the other party sent.
pub fn undecodable(status: &Status) -> Option<&Undecodable> {
    let first = std::error::Error::source(status);
    std::iter::successors(first, |e| e.source()).find_map(|e| e.downcast_ref::<Undecodable>())
}

/// `dsrelay_proto::v1::SubmitRequest` → `SubmitRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}
