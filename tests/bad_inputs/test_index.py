"""The list of what the pipeline promises on bad input and misuse, each promise with the test that holds it to it.

The tests of this folder are the newer promises; older ones live beside the code they test. This index names them
all, and the test below fails when an entry names a test that does not exist (a renamed or deleted test), so the
list cannot drift from the suite.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

PROMISES: dict[str, str] = {
    # params.yaml
    "a misspelt or unknown section stops every command, naming it with a suggestion":
        "bad_inputs/test_params.py::test_a_misspelt_section_stops_every_command_naming_it",
    "an unknown top-level key is an error": "bad_inputs/test_params.py::test_an_unknown_top_level_key_is_an_error",
    "every stage checks the whole file, not only its section":
        "bad_inputs/test_params.py::test_a_misspelt_key_in_another_section_stops_the_stage",
    "a misspelt key inside a section says 'did you mean'":
        "test_config.py::test_unknown_key_is_an_error_naming_it_with_a_suggestion",
    "a wrong type names the key and the type": "bad_inputs/test_params.py::test_a_wrong_type_names_the_key_and_the_type",
    "K that does not divide embed_dim stops the cache before any work":
        "bad_inputs/test_params.py::test_k_that_does_not_divide_embed_dim_stops_the_cache_before_any_work",
    "a cache without the negated prompts for the negation loss is refused":
        "bad_inputs/test_params.py::test_a_cache_without_negation_for_a_method_with_the_negation_loss_is_refused",
    "shards at another size than the model are refused before downloading":
        "bad_inputs/test_params.py::test_shards_at_another_size_than_the_model_are_refused_before_downloading",
    "the Prefect flow checks the whole file before any run":
        "bad_inputs/test_params.py::test_the_flow_checks_the_whole_file_before_any_run",
    "params.schema.json is current and checks params files":
        "bad_inputs/test_params.py::test_the_json_schema_is_current_and_checks_params_files",
    # output folders
    "a second run into a busy folder is refused and touches nothing":
        "bad_inputs/test_locks.py::test_second_train_into_a_busy_out_dir_is_refused_and_touches_nothing",
    "a killed run's lock never blocks the next run":
        "bad_inputs/test_locks.py::test_lock_of_a_killed_train_never_blocks_the_next_run",
    "a killed training resumes bit for bit": "test_train.py::test_killed_run_resumes_bit_for_bit",
    "a killed cache run resumes and clears its temp file":
        "test_cache.py::test_rerun_skips_finished_shards_and_clears_a_killed_runs_temp_file",
    # models and stores
    "a model folder without config.json names the key, the folder and its contents":
        "bad_inputs/test_models.py::test_model_folder_without_config_json_names_the_key_folder_and_contents",
    "an unsupported LM family is refused before loading":
        "bad_inputs/test_models.py::test_unsupported_lm_family_is_refused_before_loading_listing_the_supported",
    "a cache made for another K or model is refused naming the field":
        "test_cache.py::test_cache_for_another_model_template_or_k_is_refused_naming_the_field",
    "evaluate outside the project logs into the project's store":
        "bad_inputs/test_tracking.py::test_evaluate_outside_the_project_logs_into_the_project_store",
    "evaluate whose training run is missing stops before any work":
        "bad_inputs/test_tracking.py::test_evaluate_whose_training_run_is_not_in_the_store_stops_before_any_work",
    # data
    "failed URLs are counted; a low success rate fails with the stats written":
        "test_download.py::test_success_rate_below_threshold_fails_with_stats_written",
    "null and blank captions are counted skips, not downloaded":
        "test_download.py::test_null_and_blank_captions_are_counted_skips_not_downloaded",
    "truncated captions are counted and printed":
        "test_cache.py::test_truncated_captions_are_counted_in_the_manifest_and_printed",
    "an undecodable image is skipped and counted by the cache":
        "test_cache.py::test_undecodable_image_and_blank_caption_are_left_out_counted_and_skipped_alike",
    "an undecodable image is skipped by training, counted once, and resume stays exact":
        "test_train.py::test_undecodable_sample_is_skipped_counted_once_and_resume_stays_exact",
    "too many undecodable images stop training": "test_train.py::"
        "test_cached_and_vanilla_training_skip_the_same_sample_and_too_many_skips_stop",
    "undecodable eval images and videos are skipped, counted, and stop past the fraction":
        "test_evaluate.py::test_undecodable_images_and_videos_are_skipped_counted_and_stop_past_the_fraction",
    "16-bit images are rescaled, not clipped": "test_imageprep.py::test_sixteen_bit_grey_is_rescaled_not_clipped",
    "a raw photo evaluated directly equals it after the download":
        "test_imageprep.py::test_a_raw_photo_evaluated_directly_equals_it_after_the_download",
    # the search page (campe serve)
    "campe serve: a model folder that is not a campe model, a folder with no images or a busy port is one line":
        "test_serve.py::test_bad_input_at_start_up_is_one_line_without_a_traceback",
    "campe serve: an empty query or all-zero aspect weights is a message on the page, never a traceback":
        "test_serve.py::test_bad_queries_get_a_message_on_the_page_never_a_traceback",
    "campe serve: files that are not images are left out of the index and named on the page":
        "test_serve.py::test_search_then_a_slider_reranks_live_then_a_hit_shows_its_per_apt_maps",
    # reproducibility
    "two clones in different folders give the same lock hashes and model":
        "bad_inputs/test_clone_path.py::test_two_clones_in_different_folders_give_the_same_lock_hashes_and_model",
    "ties do not depend on the BLAS kernel or the thread count":
        "test_retrieval.py::test_ties_do_not_depend_on_the_kernel_or_thread_count",
}


def test_every_promise_names_an_existing_test():
    for promise, node in PROMISES.items():
        path, name = node.split("::")
        tree = ast.parse((TESTS / path).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in names, f"promise {promise!r}: {node} does not exist"
