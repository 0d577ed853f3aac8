"""The host over time: doctor says what it lacks, gc cleans what a killed racker left."""
