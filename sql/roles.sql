-- Least-privilege PostgreSQL roles for the kyphowatch warehouse (docs/keys.md, "Roles").
--
-- Run as a superuser while connected to the (already created) warehouse database. Shared by
-- deploy/postgres-init.sh (psql -v ...) and pipelines/roles.py, which substitutes the same
-- psql variables with properly quoted identifiers and literals:
--   :"database"  the warehouse database
--   :"owner_role"   :'owner_password'    owns the database and schema, runs migrations
--   :"loader_role"  :'loader_password'   DML on the warehouse tables, no DDL
--   :"analyst_role" :'analyst_password'  SELECT on the analyst views only
-- The analyst's SELECT on each view: the database remembers the analyst role in the setting
-- kyphowatch.analyst_role, and schema.migrate grants SELECT on every view it (re-)creates to
-- that role. Views that already exist are granted at the end of this file.

CREATE ROLE :"owner_role" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"loader_role" LOGIN PASSWORD :'loader_password';
CREATE ROLE :"analyst_role" LOGIN PASSWORD :'analyst_password';

ALTER DATABASE :"database" OWNER TO :"owner_role";
ALTER DATABASE :"database" SET kyphowatch.analyst_role = :'analyst_role';
-- Nobody else may connect; the loader's staging table is TEMPORARY, so it needs TEMP.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"database" TO :"loader_role";
GRANT CONNECT ON DATABASE :"database" TO :"analyst_role";

-- Only the owner creates objects; the others may only look names up.
ALTER SCHEMA public OWNER TO :"owner_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"loader_role", :"analyst_role";

-- Tables the owner creates (every migration, now and later) are writable by the loader.
-- The analyst gets nothing by default: views and tables are alike to default privileges.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"loader_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"loader_role";

-- Tables created before the roles (an upgraded warehouse) get the same grants now.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"loader_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"loader_role";

-- Views that already exist (an upgraded warehouse); new ones are granted by schema.migrate.
SELECT format('GRANT SELECT ON %I.%I TO %I', schemaname, viewname, :'analyst_role')
FROM pg_views WHERE schemaname = 'public'
\gexec
