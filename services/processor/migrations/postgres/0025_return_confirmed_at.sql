-- When the controller's confirmation of a RETURN_THEN_DELETE contract end's returned data was
-- recorded (ms since the epoch, the processor's clock): set by the delivery or the update
-- whose terms first say `return_confirmed`, never changed after. A contract end certificate
-- (version 2 body) states it. NULL: not confirmed, or confirmed before this column existed
-- (the certificate then says confirmed, without a time).
ALTER TABLE contract_ends ADD COLUMN return_confirmed_at BIGINT;
