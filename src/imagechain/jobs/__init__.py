"""Jobs: named backups with schedules, retention, replication and notifications, read from a TOML file
(docs/JOBS.md), run by hand (`imagechain jobs run`) or by the scheduler agent (`imagechain agent`)."""
