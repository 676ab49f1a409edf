-- A project row that is created tells nobody: no replica holds anything of a project
-- that did not exist (answers about unknown projects are never held, see
-- src/api/memo.rs), so there is nothing to drop. The first scrape or push of a site
-- creates thousands of projects at once; a trigger and a notification per row made
-- that the costliest part of it. Changes and removals still notify, as before.
DROP TRIGGER project_changed ON projects;
CREATE TRIGGER project_changed AFTER UPDATE OR DELETE ON projects
FOR EACH ROW EXECUTE FUNCTION project_changed();
