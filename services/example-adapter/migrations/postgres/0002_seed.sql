-- A few subscribers, written once on first start (migrations run once).
INSERT INTO subscribers (email, name, phone, subscribed, restricted) VALUES
    ('maija.meikalainen@example.fi', 'Maija Meikäläinen', '+358401234567', 1, 0),
    ('matti.virtanen@example.fi', 'Matti Virtanen', '+358501112233', 1, 0),
    ('anna.korhonen@example.com', 'Anna Korhonen', NULL, 1, 0),
    ('erik.lindqvist@example.se', 'Erik Lindqvist', '+46701234567', 0, 0);
