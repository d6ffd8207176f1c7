-- db-lifecycle metadata schema: ownership, approval requests, audit (flow_events, links).

-- Ownership of managed databases (R7). Unique per target cluster and name.
-- state: creating/deleting mark an apply in progress (an intent written before the
-- CREATE/DROP, so a crash never leaves a database without its row).
CREATE TABLE project_databases (
    id             bigserial PRIMARY KEY,
    target_cluster text        NOT NULL,
    database_name  text        NOT NULL,
    project_id     text        NOT NULL,
    environment    text        NOT NULL,
    state          text        NOT NULL DEFAULT 'active'
                   CHECK (state IN ('creating', 'active', 'deleting')),
    created_by     text        NOT NULL,
    request_id     uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT project_databases_target_name_key UNIQUE (target_cluster, database_name)
);
CREATE INDEX project_databases_project_idx
    ON project_databases (project_id, environment, database_name);

-- Approval requests (R6). One open (requested/approved) request per database is
-- enforced by the partial unique index below, not only by code.
CREATE TABLE approval_requests (
    id                uuid        PRIMARY KEY,
    correlation_id    text        NOT NULL,
    action            text        NOT NULL CHECK (action IN ('create', 'delete')),
    state             text        NOT NULL
                      CHECK (state IN ('requested', 'approved', 'applied', 'failed', 'denied', 'expired')),
    environment       text        NOT NULL,
    target_cluster    text        NOT NULL,
    database_name     text        NOT NULL,
    project_id        text        NOT NULL,
    requested_by      text        NOT NULL,
    requested_by_kind text        NOT NULL,
    approval_mode     text        NOT NULL CHECK (approval_mode IN ('none', 'owner', 'delegated')),
    payload           jsonb       NOT NULL,
    decided_by        text,
    decision_reason   text,
    failure_reason    text,
    apply_attempts    integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz,
    finished_at       timestamptz,
    expires_at        timestamptz NOT NULL,
    CONSTRAINT approval_requests_decided_chk
        CHECK (state = 'requested' OR state = 'expired' OR decided_by IS NOT NULL)
);
CREATE UNIQUE INDEX approval_requests_one_open_per_database
    ON approval_requests (target_cluster, database_name)
    WHERE state IN ('requested', 'approved');
CREATE INDEX approval_requests_state_idx ON approval_requests (state, id DESC);
CREATE INDEX approval_requests_project_idx ON approval_requests (project_id, id DESC);
CREATE INDEX approval_requests_env_idx ON approval_requests (environment, id DESC);
CREATE INDEX approval_requests_correlation_idx ON approval_requests (correlation_id);
CREATE INDEX approval_requests_expiry_idx ON approval_requests (expires_at)
    WHERE state = 'requested';

-- Audit trail (R8): every call (refused ones too), request, decision and apply result.
CREATE TABLE flow_events (
    id             bigserial   PRIMARY KEY,
    correlation_id text        NOT NULL,
    request_id     uuid        REFERENCES approval_requests (id),
    event_type     text        NOT NULL,
    actor_id       text        NOT NULL DEFAULT '',
    actor_kind     text        NOT NULL DEFAULT '',
    project_id     text        NOT NULL DEFAULT '',
    environment    text        NOT NULL DEFAULT '',
    database_name  text        NOT NULL DEFAULT '',
    outcome        text        NOT NULL CHECK (outcome IN ('ok', 'refused', 'error')),
    status_code    text        NOT NULL DEFAULT '',
    message        text        NOT NULL DEFAULT '',
    payload        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX flow_events_correlation_idx ON flow_events (correlation_id, id);
CREATE INDEX flow_events_request_idx ON flow_events (request_id, id) WHERE request_id IS NOT NULL;
-- At most one terminal event per request: a second `request.applied` cannot exist.
CREATE UNIQUE INDEX flow_events_one_terminal_per_request
    ON flow_events (request_id)
    WHERE event_type IN ('request.applied', 'request.failed', 'request.denied', 'request.expired');

-- Links join a correlation id to the request, database and project it touched, so a
-- UI can go from any one of them to the others.
CREATE TABLE links (
    id             bigserial   PRIMARY KEY,
    correlation_id text        NOT NULL,
    request_id     uuid        REFERENCES approval_requests (id),
    project_id     text        NOT NULL DEFAULT '',
    environment    text        NOT NULL DEFAULT '',
    target_cluster text        NOT NULL DEFAULT '',
    database_name  text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT links_unique UNIQUE NULLS NOT DISTINCT
        (correlation_id, request_id, target_cluster, database_name)
);
CREATE INDEX links_request_idx ON links (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX links_database_idx ON links (target_cluster, database_name);
