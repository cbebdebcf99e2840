"""The ground floor both sides stand on: bundle format, preprocessing, config loading, payload schemas, atomic
files, errors and the backend protocol. It never imports torch, paho or TensorRT (a test checks), so the station
and the trainer share one definition of every contract without either reaching into the other."""
