"""A ranking request: its validation (`validation`), candidate preparation and pooling (`candidates`), and the
load scenarios that generate requests (`scenario`, `scenarios/*.yaml`)."""
