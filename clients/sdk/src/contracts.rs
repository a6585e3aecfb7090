//! Contract ends (`ContractService`, operators only): ending the contract with a processor,
//! following it, making the deferred choice and confirming the returned package.

use dsrelay_proto::v1::{
    ChooseContractEndRequest, ConfirmReturnRequest, Contract, ContractEndChoice,
    EndContractRequest, GetContractRequest, ListContractsRequest,
};
use tonic::Status;

use crate::RegistryClient;

/// When a contract ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectiveAt {
    /// Now, by the registry's clock.
    Now,
    /// At this instant (ms since the Unix epoch); not in the past.
    At(i64),
}

impl RegistryClient {
    /// Ends the contract with `processor` (its registry-side name). Idempotent per
    /// `idempotency_key`: the same call again returns the first contract end with
    /// `deduplicated = true`. FAILED_PRECONDITION while another contract end with the
    /// processor has not finished.
    pub async fn end_contract(
        &self,
        processor: impl Into<String>,
        choice: ContractEndChoice,
        effective: EffectiveAt,
        idempotency_key: impl Into<String>,
    ) -> Result<Contract, Status> {
        self.end_contract_to(processor, choice, "", effective, idempotency_key)
            .await
    }

    /// As [`Self::end_contract`], returning the data to `transfer_recipient` (a name in the
    /// registry's `[[recipients]]`) instead of to the registry when not empty; only with
    /// RETURN_THEN_DELETE (else INVALID_ARGUMENT).
    pub async fn end_contract_to(
        &self,
        processor: impl Into<String>,
        choice: ContractEndChoice,
        transfer_recipient: impl Into<String>,
        effective: EffectiveAt,
        idempotency_key: impl Into<String>,
    ) -> Result<Contract, Status> {
        let (effective_at, effective_now) = match effective {
            EffectiveAt::Now => (None, true),
            EffectiveAt::At(ms) => (Some(dsrelay_proto::timestamp_from_millis(ms)), false),
        };
        let request = self.request(EndContractRequest {
            processor: processor.into(),
            choice: choice as i32,
            effective_at,
            effective_now,
            idempotency_key: idempotency_key.into(),
            transfer_recipient: transfer_recipient.into(),
        });
        Ok(self
            .contracts
            .clone()
            .end_contract(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// One contract end with each subprocessor's progress.
    pub async fn get_contract(&self, contract_id: impl Into<String>) -> Result<Contract, Status> {
        let request = self.request(GetContractRequest {
            contract_id: contract_id.into(),
        });
        Ok(self
            .contracts
            .clone()
            .get_contract(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Contract ends, newest first; only `processor`'s when not empty.
    pub async fn list_contracts(
        &self,
        processor: impl Into<String>,
    ) -> Result<Vec<Contract>, Status> {
        let request = self.request(ListContractsRequest {
            processor: processor.into(),
        });
        Ok(self
            .contracts
            .clone()
            .list_contracts(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner()
            .contracts)
    }

    /// Makes the choice a contract end was created without (DELETE or RETURN_THEN_DELETE),
    /// during its grace period.
    pub async fn choose_contract_end(
        &self,
        contract_id: impl Into<String>,
        choice: ContractEndChoice,
    ) -> Result<Contract, Status> {
        self.choose_contract_end_to(contract_id, choice, "").await
    }

    /// As [`Self::choose_contract_end`], returning the data to `transfer_recipient` when not
    /// empty (RETURN_THEN_DELETE only).
    pub async fn choose_contract_end_to(
        &self,
        contract_id: impl Into<String>,
        choice: ContractEndChoice,
        transfer_recipient: impl Into<String>,
    ) -> Result<Contract, Status> {
        let request = self.request(ChooseContractEndRequest {
            contract_id: contract_id.into(),
            choice: choice as i32,
            transfer_recipient: transfer_recipient.into(),
        });
        Ok(self
            .contracts
            .clone()
            .choose_contract_end(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }

    /// Confirms receipt of a RETURN_THEN_DELETE's verified package, named by the SHA-256
    /// (hex) of its `manifest.json`; the processor then deletes the data. For a return to a
    /// transfer recipient `manifest_sha256` is empty: the recipient's receipts are the proof.
    pub async fn confirm_return(
        &self,
        contract_id: impl Into<String>,
        manifest_sha256: impl Into<String>,
    ) -> Result<Contract, Status> {
        let request = self.request(ConfirmReturnRequest {
            contract_id: contract_id.into(),
            manifest_sha256: manifest_sha256.into(),
        });
        Ok(self
            .contracts
            .clone()
            .confirm_return(request)
            .await
            .map_err(|status| self.failed(status))?
            .into_inner())
    }
}
