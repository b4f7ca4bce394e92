"""Call records: what happened on each call, kept in PostgreSQL (docs/operations.md "Call records").

Workers and the supervisor append record items to a local crash-safe spool (``spool``); the
supervisor's writer (``writer``) ships them to PostgreSQL (``store``, schema in ``migrations/``) and
fills the webhook outbox that ``webhooks`` delivers. The admin API (``admin``) reads the records back.
Nothing on the audio path ever waits for the database.
"""
