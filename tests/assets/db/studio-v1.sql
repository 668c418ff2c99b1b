-- A history file written by PEFT Studio at schema 1 (before the bake-off migration), dumped
-- with sqlite3's iterdump. tests/test_bakeoff_migration.py loads it and sets user_version 1.
BEGIN TRANSACTION;
CREATE TABLE checkpoints (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (run_id, step), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
INSERT INTO "checkpoints" VALUES(1,1,2,'checkpoints/checkpoint-2','2026-11-22 10:06:10.490539');
CREATE TABLE datasets (
	id INTEGER NOT NULL, 
	project_id INTEGER NOT NULL, 
	name VARCHAR NOT NULL, 
	folder VARCHAR, 
	source_path TEXT, 
	source_hash VARCHAR, 
	format VARCHAR, 
	mapping JSON, 
	num_rows INTEGER, 
	num_train INTEGER, 
	num_eval INTEGER, 
	stats JSON, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE
);
INSERT INTO "datasets" VALUES(1,1,'Dates to ISO 8601','dates',NULL,NULL,'alpaca',NULL,450,400,50,NULL,'2026-11-22 10:06:10.477525');
CREATE TABLE exports (
	id INTEGER NOT NULL, 
	run_id INTEGER, 
	project_id INTEGER NOT NULL, 
	kind VARCHAR NOT NULL, 
	path TEXT NOT NULL, 
	dtype VARCHAR, 
	size_bytes INTEGER, 
	status VARCHAR NOT NULL, 
	verification JSON, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE SET NULL, 
	FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE
);
INSERT INTO "exports" VALUES(1,1,1,'adapter','exports/a','float32',NULL,'verified',NULL,'2026-11-22 10:06:10.492580');
CREATE TABLE metrics (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	name VARCHAR NOT NULL, 
	value FLOAT, 
	wall_time FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (run_id, step, name), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
INSERT INTO "metrics" VALUES(1,1,1,'loss',2.5,1.0);
INSERT INTO "metrics" VALUES(2,1,1,'learning_rate',0.0001,1.0);
INSERT INTO "metrics" VALUES(3,1,2,'loss',2.0,2.0);
INSERT INTO "metrics" VALUES(4,1,2,'eval_loss',2.1,2.0);
CREATE TABLE projects (
	id INTEGER NOT NULL, 
	name VARCHAR(120) COLLATE "NOCASE" NOT NULL, 
	folder VARCHAR NOT NULL, 
	model_source VARCHAR NOT NULL, 
	notes TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT project_name_not_blank CHECK (length(trim(name)) > 0), 
	UNIQUE (name), 
	UNIQUE (folder)
);
INSERT INTO "projects" VALUES(1,'Made by schema 1','made-by-schema-1','default','','2026-11-22 10:06:10.474697','2026-11-22 10:06:10.474704');
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	project_id INTEGER NOT NULL, 
	dataset_id INTEGER, 
	name VARCHAR NOT NULL, 
	method VARCHAR NOT NULL, 
	spec JSON NOT NULL, 
	status VARCHAR NOT NULL, 
	pid INTEGER, 
	exit_code INTEGER, 
	heartbeat_at DATETIME, 
	cancel_request VARCHAR, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	error TEXT, 
	notes TEXT NOT NULL, 
	folder VARCHAR, 
	PRIMARY KEY (id), 
	FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE, 
	FOREIGN KEY(dataset_id) REFERENCES datasets (id) ON DELETE SET NULL
);
INSERT INTO "runs" VALUES(1,1,1,'lora on dates','lora','{"method": "lora", "sample_task": "dates", "max_steps": 4}','completed',NULL,0,NULL,NULL,'2026-11-22 10:06:10.480722','2026-11-22 10:06:10.481206','2026-11-22 10:06:10.481208',NULL,'','run-0001-lora-on-dates');
INSERT INTO "runs" VALUES(2,1,1,'waiting','ia3','{"method": "ia3"}','queued',NULL,NULL,NULL,NULL,'2026-11-22 10:06:10.493598',NULL,NULL,NULL,'',NULL);
CREATE INDEX ix_datasets_project_id ON datasets (project_id);
CREATE INDEX ix_datasets_source_hash ON datasets (source_hash);
CREATE INDEX ix_runs_dataset_id ON runs (dataset_id);
CREATE INDEX ix_runs_status ON runs (status);
CREATE INDEX ix_runs_project_id ON runs (project_id);
CREATE INDEX ix_metrics_run_name_step ON metrics (run_id, name, step);
CREATE INDEX ix_exports_run_id ON exports (run_id);
CREATE INDEX ix_exports_project_id ON exports (project_id);
COMMIT;
