-- Host resources (sites, hosts, datastores) belong to the system tenant and are granted to other
-- tenants. Granting a datastore grants sight of its host and site too: one row per object, all
-- with the datastore as `via_id`, so revoking the datastore takes exactly those rows away.
CREATE TABLE inventory_grants (
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    via_id     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, id, tenant_id, via_id)
);
CREATE INDEX inventory_grants_tenant ON inventory_grants(tenant_id, kind);
CREATE INDEX inventory_grants_via ON inventory_grants(via_id, tenant_id);
