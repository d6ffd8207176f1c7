-- The identity of the database the service created: its pg_database oid. A database
-- dropped and re-created by hand under the same name has another oid, and is then
-- treated as unmanaged (never adopted, never dropped). NULL while an apply is in
-- flight (or for rows written before this column existed): no identity to compare.
ALTER TABLE project_databases ADD COLUMN database_oid bigint;
