-- Audit rows carry the client's certificate identity (its URI and DNS SANs and CN=, comma
-- separated) when the data plane verified one ([tls] client_ca); null otherwise.
ALTER TABLE rejections ADD COLUMN identity text;
