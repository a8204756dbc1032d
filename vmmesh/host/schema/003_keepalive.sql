-- vmmesh local state, version 3.
-- VMs kept alive (opt-in, `--keep-alive`) are restarted or recovered by the
-- mesh: each row says whether, its generation (one more at every recovery on
-- another host, so an old copy never runs again) and where it came from.
ALTER TABLE vms ADD COLUMN keep_alive INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
ALTER TABLE vms ADD COLUMN origin TEXT NOT NULL DEFAULT '';
