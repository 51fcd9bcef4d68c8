-- Retention deletes the audit rows older than a cut-off, and `since` filters start from one; both
-- walk this index instead of the whole log.
CREATE INDEX rejections_by_at ON rejections (at);
