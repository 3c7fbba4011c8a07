-- 0020: the webhook notification log names each receiver by the SHA-256 of its URL ('sha256:<hex>'), never the
-- URL itself: receiver URLs often carry a secret (a token in the path or query, basic-auth credentials). Rows
-- written before are copied under the hashed name (the same hash tower_core/store/sla.py computes, so what they
-- record is still known and nothing is sent twice), then the raw ones are deleted. Both statements can run
-- again: a copy replaces its earlier copy (same sorting key), and the delete finds nothing left.
INSERT INTO $db.sla_notifications (Receiver, Fingerprint, StartsAt, Status, GroupKey, SentAt, HttpStatus, Version)
SELECT concat('sha256:', lower(hex(SHA256(Receiver)))), Fingerprint, StartsAt, Status, GroupKey, SentAt, HttpStatus,
    Version
FROM $db.sla_notifications
WHERE NOT startsWith(Receiver, 'sha256:');
ALTER TABLE $db.sla_notifications DELETE WHERE NOT startsWith(Receiver, 'sha256:') SETTINGS mutations_sync = 1;
