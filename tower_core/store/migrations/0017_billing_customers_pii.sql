-- 0017: names and e-mails of billing customers stored raw before the reconciler's pull pseudonymized them
-- (reconciler/runner.py scrub_customer). The reconciler compares ids only and no HMAC key is at hand here,
-- so they are blanked; pseudonyms already stored stay. Running it again changes nothing.
ALTER TABLE $db.billing_customers
    UPDATE Name = if(startsWith(Name, 'hmac-sha256:'), Name, ''), Email = if(startsWith(Email, 'hmac-sha256:'), Email, '')
    WHERE (Name != '' AND NOT startsWith(Name, 'hmac-sha256:')) OR (Email != '' AND NOT startsWith(Email, 'hmac-sha256:'))
SETTINGS mutations_sync = 2;
