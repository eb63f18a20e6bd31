"""Assignment `episode` (course/episode.md): which languages the query batches come from, and the
sampling of a meta-batch of tasks (support in the source language, query in a language drawn
uniformly per task). Batch streams are stand-ins here, so every read can be counted.
"""

import pytest
import torch

from episodes import EpisodeSource, query_languages


class Stream:
    """A stand-in for ner_data.BatchStream: batch i of language `lang` is ("lang", i)."""

    def __init__(self, lang):
        self.lang, self.read = lang, 0

    def next_batch(self):
        self.read += 1
        return (self.lang, self.read - 1)


def source(query_langs, source_lang="en"):
    episodes = EpisodeSource.__new__(EpisodeSource)   # without reading a corpus
    episodes.support = Stream(source_lang)
    episodes.query = {lang: Stream(lang) for lang in query_langs}
    episodes.fine_tune = None
    return episodes


def test_query_languages_cross_and_same():
    assert query_languages("en", ["de", "es"], "cross") == ["de", "es"]
    assert query_languages("en", ("de",), "cross") == ["de"]
    assert query_languages("en", ["de", "es"], "same") == ["en"]
    with pytest.raises(ValueError, match="other"):
        query_languages("en", ["de"], "other")


def test_each_task_is_a_support_batch_and_a_query_batch_read_in_order():
    episodes = source(["de", "es"])
    tasks = episodes.sample(6, torch.Generator().manual_seed(0))
    assert len(tasks) == 6 and all(len(task) == 2 for task in tasks)
    assert [support for support, _ in tasks] == [("en", i) for i in range(6)]   # one new batch per task
    for lang in ("de", "es"):
        indices = [i for (query_lang, i) in (query for _, query in tasks) if query_lang == lang]
        assert indices == list(range(len(indices)))              # each language's stream read in order
        assert episodes.query[lang].read == len(indices)         # and only when that language was drawn
    assert episodes.sample(0, torch.Generator()) == []


@pytest.mark.parametrize("langs", [["de", "es"], ["de", "es", "it"]])
def test_the_query_language_is_uniform_over_the_query_languages(langs):
    n = 3000
    tasks = source(langs).sample(n, torch.Generator().manual_seed(1))
    for lang in langs:
        share = sum(query[0] == lang for _, query in tasks) / n
        expected = 1 / len(langs)
        assert abs(share - expected) < 4 * (expected * (1 - expected) / n) ** 0.5   # 4 standard errors


def test_one_query_language_is_always_that_language():
    tasks = source(["en"]).sample(5, torch.Generator().manual_seed(0))
    assert [query for _, query in tasks] == [("en", i) for i in range(5)]


def test_the_draws_come_from_the_generator_only():
    def languages(seed, global_seed):
        torch.manual_seed(global_seed)   # the global RNG must not matter: resuming restores the generator only
        return [query[0] for _, query in source(["de", "es", "it"]).sample(40, torch.Generator().manual_seed(seed))]
    assert languages(0, 0) == languages(0, 123)
    assert languages(0, 0) != languages(1, 0)
    generator = torch.Generator().manual_seed(0)
    episodes = source(["de", "es", "it"])
    first, second = episodes.sample(20, generator), episodes.sample(20, generator)
    assert [q[0] for _, q in first] != [q[0] for _, q in second]   # the generator advances
