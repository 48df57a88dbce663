"""ERP posting service: the reference ERP adapter of docs/event-contract.md and docs/sap-mapping.md.

Consumes the gateways' CloudEvents (NATS JetStream durable consumer or MQTT shared subscription), validates them,
deduplicates them by (source, id) in PostgreSQL, books them into a ledger, writes SAP production-order confirmations
(ProdnOrdConf2) into a transactional outbox and posts that outbox to the ERP over HTTP. See docs/erp-service.md.
"""
