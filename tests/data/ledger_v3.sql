BEGIN TRANSACTION;
CREATE TABLE autoexec_actions (
	idempotency_key VARCHAR(80) NOT NULL, 
	playbook VARCHAR(100) NOT NULL, 
	playbook_version VARCHAR(100) NOT NULL, 
	insight VARCHAR(300) NOT NULL, 
	partition_key VARCHAR(200) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	rule VARCHAR(100) NOT NULL, 
	action VARCHAR(100), 
	decision VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	delivery VARCHAR(16) DEFAULT 'at_least_once' NOT NULL, 
	attempts INTEGER DEFAULT '0' NOT NULL, 
	run_id VARCHAR(64), 
	worker VARCHAR(200), 
	lease_expires_at FLOAT, 
	request_digest VARCHAR(64), 
	payload TEXT, 
	output TEXT, 
	instance_id VARCHAR(80), 
	step VARCHAR(100), 
	detail VARCHAR(500), 
	error TEXT, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	completed_at DATETIME, 
	PRIMARY KEY (idempotency_key)
);
INSERT INTO "autoexec_actions" VALUES('a177ed9b39a2eed4741971f1769883ba','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000000','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'78967a8e2e244ac59161022f3bbcc43c7f959eedd4de1411c4ceae5648ae48b0',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('b05b6bfb2fc4a650dc5f5fc4c15ada9a','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000001','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('ea6a32aae3c1f7812c4ac7bd8c274289','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000002','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('dacf94c56113e8a6ce9ec8167b506ccf','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000003','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('c4208831d109e31e2be40307c9d9279b','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000004','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('1d7a2257fc5f2e776340d1bc0c21789f','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000005','at_risk','retention_email','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'4a5359361cbe474e10a822853bc2317c2a5b21b49331f7c038304b823a8a1856',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('c559f91acdd3f2a839865c55f4b22322','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000006','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('7bd886473a58e28254280a72881346f9','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000007','unsure',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('9b7f4c84e1226295adaef4913cdf45f2','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000008','at_risk','retention_email','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'ff29f43b139611607463b1b71c10b720052fcd26edc9276fc241388e0a838428',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('760b6efbf31494305994c13a345b3796','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000009','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('b0cc27e503015d54c8d63ebf2364caf6','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000010','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('a1c17edfa7cf8c246530130e6df8839d','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000011','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('2f9f1eb37107c7fc9a22a906ced11470','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000012','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('30d24351598b36b6b53ce86e894035bc','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000013','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('1b5230020c84d2593b95059014d028f7','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000014','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'ca409f2c23c3719b5c040cd9c839b6853c84217de471f6631ce8d6a9b2e43c34',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('e4143559c47a5e921b0fc5f184aea56f','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000015','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'46140e328a47a39c2f595a865b0dbf20a2d8a6f5851090062e8016a658a46994',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('18f11b4b9a71fdfebdfb49c4fa4309e0','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000016','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('4dbff929f681edc5f26c612dc19385ea','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000017','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('855bb893a52e7dc1a4c3bbd4d0254e76','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000018','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'f441b8da2521ad8cd71f76dc17ef7c2e05993703a6fc5b0437b664e58212447f',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('8318acab077290cd34583e6866f0c8b1','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000019','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('e8e6c806e7f898f50d7713eb8b0349aa','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000020','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('6483a50cb937a507bd4be58b3bb6b080','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000021','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('153ed99f055fc91ef1f830cc99b207db','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000022','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'4a7f3af073cfbbe6e95ac4bc5d4a291b245d4e906cd074e775cc102589499914',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('ee567a6170ff3b8824ba49761bf64e37','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000023','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('11f775e03978edd83caee1a641419f93','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000024','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('e87bad989d2f6f57f5885d9565208b47','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000025','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'de25d58f03f21d632dbd1ee3877c6c207c2ce0384dc239689819235ca710c045',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('24b3de5eeb356c61109cf917c0a5efe5','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000026','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('38cf53347070b8a62e05e67b902b1992','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000027','at_risk','retention_email','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'e1e591e9b90f96829c7a1970530b480abfb68945100f579621c96db6f1514072',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('3769a9e0847530308533985141b915bf','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000028','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'6940af5f82e20a0a30e5b4cc9c496cc9de559ffa39faa26286e1035f51ce9762',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('214cda050bf2eae9b1749a992bd259ea','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000029','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'76d7ddaca51908f0bcd32d317c0d9c3166f5960031b155db4b922510acb243c6',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('02db6794dfddad9a113ce3c6df31d0f7','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000030','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('543f419a15f4e706c7e40a0b9f3de4f3','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000031','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('d24721a7f76e4d9bdbc01da291dd59df','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000032','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('5e18bb84cb2e91d11c6cf2069377023e','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000033','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('2d5d4d880720b1c56a38562c7749ae6c','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000034','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'bd7616d4f08d179c152fc0b4de152ea62b6ea1ecf85420a5f63038c66dba423b',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('e6b0cc9c5aa4416f25829200581d2b20','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000035','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('db53fdbd3d10caf7c04f960dfc693ecc','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000036','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('dc9c899a778d25fb3dc3b25deb4663d0','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000037','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('d09b3e8409768f7d807cf8974d08b739','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000038','unsure',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('0fa131d5a1b6b4ded90d06700b5bc169','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000039','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('f2393f9e5403712db22f4e5f33df2c1c','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000040','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('b97787db524889e222785351362d8e2a','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000041','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('efaf268700fb328b2200fa7746927f5f','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000042','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'9c1901592d5de02f759357815455e71e7e714d2f50eb3c3138589c48b670e2ee',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('279a1c3ebe87c7840b730c322e484281','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000043','at_risk','retention_email','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'8572a4bf5c29f683a202b78e0568da8e5c8a933c1003da87e6d7a3c75b662099',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('0e2585c0fab1995fd3716525a3c2f3f9','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000044','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'d5f7723770a305e95cc7dea3e796d7a5e799a0158854b1af50de2ad852bcea45',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('e9a030e3d71b9e2a89c2360a0d4bfed6','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000045','at_risk','retention_email','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'a6d9a2b514503a395df3ab9102bbabe9135cd6abf82056025e64199f2c589f72',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('2399911f7d6e78853e7392f84fcc746e','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000046','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('842853b4656b350a01026cb21be492c0','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000047','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'1ada4539a9fcb6d1aac69706ffa995bf8d97834feb61d8bfce0b9c1bd21a8c63',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('2bb5f6bc6fa0a3b411c824d761b5a02c','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000048','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'afee5ff8593033f143e208914e1b3e804ca3536f3c20ff2e1628570113a14dd2',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('9b1015679f9e2d005038c4cb199821f5','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000049','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('3de79d822c1e49822b1bfe1f0d99b210','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000050','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('beb2547488bb5891b7d7b382162dd3ce','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000051','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'e621127c47f113157c5c151c6e00528b9cfe12a8fbff4d0986490dd6a173b832',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
INSERT INTO "autoexec_actions" VALUES('099ff8ac54e39839a5ac43a842d5917e','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000052','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('91fd64ffc539cd8f65fb497ec9136322','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000053','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('3b9df718b4f45a40efceccb48567fefc','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000054','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('0308aee5fb7b0c66404e6f24daf92a5f','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000055','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('994fe5f18ea69c0426d15464725a1716','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000056','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('7530be3ed4a70402cd8d1bcdaa31de44','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000057','(none)',NULL,'skip','skipped','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('7b1f20ca1d8306f05f18ee1f1ec74c4c','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000058','vip_at_risk',NULL,'escalate','escalated','at_least_once',0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.568483',NULL);
INSERT INTO "autoexec_actions" VALUES('8dc2381a8dd26067077713c4b54c6743','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000059','watch','crm_task','act','succeeded','at_least_once',1,NULL,'vm:409eb4c8d4d1:2973:227028:748ec764',NULL,'46939de5d0789b8714eeb4f0e41879d85817b96b432faa52d97d77f892319cb2',NULL,NULL,NULL,NULL,'recorded',NULL,'2026-12-02 07:49:48.568483','2026-12-02 07:49:48.603352','2026-12-02 07:49:48.603352');
CREATE TABLE autoexec_actions_superseded (
	old_key VARCHAR(80) NOT NULL, 
	idempotency_key VARCHAR(80) NOT NULL, 
	playbook VARCHAR(100) NOT NULL, 
	playbook_version VARCHAR(100) NOT NULL, 
	partition_key VARCHAR(200) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	action VARCHAR(100), 
	state VARCHAR(16) NOT NULL, 
	run_id VARCHAR(64), 
	completed_at DATETIME, 
	migrated_at DATETIME NOT NULL, 
	PRIMARY KEY (old_key)
);
CREATE TABLE autoexec_approval_decisions (
	approval_id VARCHAR(80) NOT NULL, 
	approver VARCHAR(200) NOT NULL, 
	decision VARCHAR(16) NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	note TEXT, 
	via VARCHAR(32) NOT NULL, 
	decided_at DATETIME NOT NULL, 
	PRIMARY KEY (approval_id, approver)
);
CREATE TABLE autoexec_approvals (
	approval_id VARCHAR(80) NOT NULL, 
	instance_id VARCHAR(80) NOT NULL, 
	playbook VARCHAR(100) NOT NULL, 
	playbook_version VARCHAR(100) NOT NULL, 
	workflow VARCHAR(100) NOT NULL, 
	insight VARCHAR(300) NOT NULL, 
	partition_key VARCHAR(200) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	rule VARCHAR(100) NOT NULL, 
	step VARCHAR(100) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	approvers TEXT NOT NULL, 
	min_approvals INTEGER DEFAULT '1' NOT NULL, 
	payload TEXT NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	value FLOAT, 
	condition TEXT, 
	on_expiry VARCHAR(16) NOT NULL, 
	requested_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	sla_due_at DATETIME, 
	decided_at DATETIME, 
	decided_by TEXT, 
	decided_via VARCHAR(32), 
	decision_note TEXT, 
	applied_at DATETIME, 
	run_id VARCHAR(64), 
	PRIMARY KEY (approval_id)
);
CREATE TABLE autoexec_controls (
	scope VARCHAR(100) NOT NULL, 
	paused BOOLEAN NOT NULL, 
	reason TEXT, 
	updated_by VARCHAR(200), 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (scope)
);
CREATE TABLE autoexec_escalations (
	idempotency_key VARCHAR(80) NOT NULL, 
	playbook VARCHAR(100) NOT NULL, 
	playbook_version VARCHAR(100) NOT NULL, 
	insight VARCHAR(300) NOT NULL, 
	partition_key VARCHAR(200) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	rule VARCHAR(100) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	reason TEXT NOT NULL, 
	data TEXT DEFAULT '{}' NOT NULL, 
	status VARCHAR(16) DEFAULT 'open' NOT NULL, 
	created_at DATETIME NOT NULL, 
	resolved_at DATETIME, 
	resolved_by VARCHAR(200), 
	resolution TEXT, 
	dedupe_key VARCHAR(80), 
	proposed_action VARCHAR(100), 
	decided_via VARCHAR(32), 
	PRIMARY KEY (idempotency_key)
);
INSERT INTO "autoexec_escalations" VALUES('b05b6bfb2fc4a650dc5f5fc4c15ada9a','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000001','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.8972, "confidence": 0.638, "customer_id": "C000001", "email": "customer1@example.com", "entity_id": "C000001", "lifetime_value": 6284.62, "name": "Customer 1"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'548aa4f9ae16a0310871894110127274',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('ea6a32aae3c1f7812c4ac7bd8c274289','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000002','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.7757, "confidence": 0.6765, "customer_id": "C000002", "email": "customer2@example.com", "entity_id": "C000002", "lifetime_value": 7930.24, "name": "Customer 2"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'5b765cbd2bd27371f14ea3556a36db46',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('7bd886473a58e28254280a72881346f9','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000007','unsure','rule','The model is unsure about this customer','{"churn_score": 0.8212, "confidence": 0.0967, "customer_id": "C000007", "email": "customer7@example.com", "entity_id": "C000007", "lifetime_value": 3631.27, "name": "Customer 7"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'c76fa6473f3ebd6734e18b7103a38be2',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('18f11b4b9a71fdfebdfb49c4fa4309e0','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000016','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.9955, "confidence": 0.9449, "customer_id": "C000016", "email": "customer16@example.com", "entity_id": "C000016", "lifetime_value": 9803.95, "name": "Customer 16"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'63bd134fc2b1af5a03c275e6faa42d68',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('4dbff929f681edc5f26c612dc19385ea','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000017','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.7927, "confidence": 0.9039, "customer_id": "C000017", "email": "customer17@example.com", "entity_id": "C000017", "lifetime_value": 5155.23, "name": "Customer 17"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'f075efab0e93fc3d9f9ade0ced8d822b',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('8318acab077290cd34583e6866f0c8b1','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000019','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.989, "confidence": 0.1455, "customer_id": "C000019", "email": "customer19@example.com", "entity_id": "C000019", "lifetime_value": 8965.41, "name": "Customer 19"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'a0bd8642e7430b5de1fbf6cf124ae27f',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('d09b3e8409768f7d807cf8974d08b739','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000038','unsure','rule','The model is unsure about this customer','{"churn_score": 0.83, "confidence": 0.0304, "customer_id": "C000038", "email": "customer38@example.com", "entity_id": "C000038", "lifetime_value": 2029.12, "name": "Customer 38"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'64f06a11c865e0ceaa9e88798b3cfd97',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('b97787db524889e222785351362d8e2a','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000041','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.8803, "confidence": 0.6578, "customer_id": "C000041", "email": "customer41@example.com", "entity_id": "C000041", "lifetime_value": 9154.64, "name": "Customer 41"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'869ffc3f7181a923f73a393039b51e2e',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('9b1015679f9e2d005038c4cb199821f5','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000049','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.8713, "confidence": 0.5191, "customer_id": "C000049", "email": "customer49@example.com", "entity_id": "C000049", "lifetime_value": 9613.51, "name": "Customer 49"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'ae7898f6e3b2be9ed777ef56fff8edb9',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('994fe5f18ea69c0426d15464725a1716','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000056','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.8163, "confidence": 0.8105, "customer_id": "C000056", "email": "customer56@example.com", "entity_id": "C000056", "lifetime_value": 7640.3, "name": "Customer 56"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'94aa444a952186787e4b6170e321ba7b',NULL,NULL);
INSERT INTO "autoexec_escalations" VALUES('7b1f20ca1d8306f05f18ee1f1ec74c4c','churn_outreach','v-6b205241ed6b','churn_outreach','2026-11-24','C000058','vip_at_risk','rule','High-value customer at risk: an account manager should call','{"churn_score": 0.9787, "confidence": 0.4189, "customer_id": "C000058", "email": "customer58@example.com", "entity_id": "C000058", "lifetime_value": 7299.89, "name": "Customer 58"}','open','2026-12-02 07:49:48.581160',NULL,NULL,NULL,'eed1a812caefbfadcd70a41f5294e3f1',NULL,NULL);
CREATE TABLE autoexec_schema_version (
	id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	migrated_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "autoexec_schema_version" VALUES(1,3,'2026-12-02 07:49:48.518682');
CREATE TABLE autoexec_suppressions (
	playbook VARCHAR(100) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	until DATETIME NOT NULL, 
	suppressed_by VARCHAR(200) NOT NULL, 
	note TEXT, 
	via VARCHAR(32), 
	escalation_key VARCHAR(80), 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (playbook, entity_id)
);
CREATE TABLE autoexec_workflow_instances (
	instance_id VARCHAR(80) NOT NULL, 
	playbook VARCHAR(100) NOT NULL, 
	playbook_version VARCHAR(100) NOT NULL, 
	workflow VARCHAR(100) NOT NULL, 
	insight VARCHAR(300) NOT NULL, 
	partition_key VARCHAR(200) NOT NULL, 
	entity_id VARCHAR(300) NOT NULL, 
	rule VARCHAR(100) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	step VARCHAR(100), 
	step_index INTEGER DEFAULT '0' NOT NULL, 
	attempt INTEGER DEFAULT '0' NOT NULL, 
	step_started_at DATETIME, 
	next_due DATETIME, 
	outputs TEXT DEFAULT '{}' NOT NULL, 
	log TEXT DEFAULT '[]' NOT NULL, 
	data TEXT DEFAULT '{}' NOT NULL, 
	error TEXT, 
	worker VARCHAR(200), 
	lease_expires_at FLOAT, 
	run_id VARCHAR(64), 
	cancelled_by VARCHAR(200), 
	cancel_reason TEXT, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	PRIMARY KEY (instance_id)
);
CREATE INDEX ix_autoexec_actions_partition ON autoexec_actions (playbook, partition_key);
CREATE INDEX ix_autoexec_actions_instance ON autoexec_actions (instance_id);
CREATE INDEX ix_autoexec_actions_entity ON autoexec_actions (playbook, entity_id);
CREATE INDEX ix_autoexec_actions_state ON autoexec_actions (state);
CREATE INDEX ix_autoexec_actions_worker ON autoexec_actions (worker);
CREATE INDEX ix_autoexec_workflow_partition ON autoexec_workflow_instances (playbook, partition_key, state);
CREATE INDEX ix_autoexec_workflow_entity ON autoexec_workflow_instances (playbook, entity_id);
CREATE INDEX ix_autoexec_workflow_due ON autoexec_workflow_instances (playbook, next_due) WHERE state IN ('running', 'waiting', 'failing');
CREATE INDEX ix_autoexec_escalations_partition ON autoexec_escalations (playbook, partition_key, status);
CREATE UNIQUE INDEX ux_autoexec_escalations_open_case ON autoexec_escalations (dedupe_key) WHERE status = 'open';
CREATE INDEX ix_autoexec_actions_superseded_idempotency_key ON autoexec_actions_superseded (idempotency_key);
CREATE INDEX ix_autoexec_approvals_partition ON autoexec_approvals (playbook, partition_key, status);
CREATE INDEX ix_autoexec_approvals_instance ON autoexec_approvals (instance_id, step);
CREATE INDEX ix_autoexec_approvals_wake ON autoexec_approvals (playbook, partition_key) WHERE applied_at IS NULL AND status IN ('approved', 'rejected');
COMMIT;
