-- Low-credit notifications: contact addresses, the outbox written by the billing
-- transaction, and each channel's delivery state.

-- Who is told about a project (PUT /api/projects/{project}/contacts replaces the list).
CREATE TABLE project_contacts (
    project    text PRIMARY KEY,
    emails     text[] NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per threshold crossing, written in the transaction that crossed it. The
-- key (project, threshold, granted) makes each crossing notify once; a new grant
-- level re-arms. NUMERIC compares by value, so 0.5 and 0.50 are one threshold.
CREATE TABLE notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project    text        NOT NULL,
    threshold  numeric     NOT NULL CHECK (threshold <> 'NaN' AND threshold > 0),
    granted    numeric     NOT NULL CHECK (granted <> 'NaN' AND granted > 0),
    -- used credits right after the crossing
    used       numeric     NOT NULL CHECK (used <> 'NaN'),
    -- the clock of the billing run or grant change that crossed it
    crossed_at timestamptz NOT NULL,
    -- what crossed it: billed usage, a changed grant, an adjustment
    cause      text        NOT NULL CHECK (cause IN ('usage', 'grant', 'adjustment')),
    UNIQUE (project, threshold, granted)
);
CREATE INDEX notifications_project_idx ON notifications (project, crossed_at DESC);

-- Delivery of one notification over one channel; email and webhook are independent.
--   pending  due at next_attempt_at
--   sending  claimed by a sender until lease_until (it is talking to the server now)
--   sent     accepted by the server (sent_at)
--   failed   given up: permanent error, or max attempts (last_error says why)
--   skipped  nothing to do: no recipients, or MAIL_CONTACT_URL not set
--   unknown  the sender vanished while sending: maybe delivered, never resent
--            automatically (POST /api/notifications/{id}/resend)
CREATE TABLE notification_deliveries (
    notification_id bigint      NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    channel         text        NOT NULL CHECK (channel IN ('email', 'webhook')),
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped', 'unknown')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    lease_until     timestamptz,
    last_error      text,
    sent_at         timestamptz,
    -- email: the envelope it went to, for the record
    recipients      text[],
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notification_id, channel),
    CHECK (status <> 'pending' OR next_attempt_at IS NOT NULL),
    CHECK (status <> 'sending' OR lease_until IS NOT NULL)
);
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX notification_deliveries_sending_idx ON notification_deliveries (lease_until)
    WHERE status = 'sending';
