"""Stage two: the Img2Vec student, trained from the feature cache."""
