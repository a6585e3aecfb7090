-- Certificates by their own id, so that an acknowledgement batch's check of each certificate
-- against those stored before it (an id reused with another body, a `follows` naming a
-- certificate of another task) reads the few rows under the ids it names rather than every
-- certificate the registry holds. Not unique: rows stored before that check may repeat an id.
CREATE INDEX certificates_by_id ON certificates (certificate_id);
